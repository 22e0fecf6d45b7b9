"""Duplicate and near-duplicate prompts across splits, so no test prompt was seen in training.

Two prompts are duplicates when their normalised forms (case folded, punctuation dropped,
whitespace collapsed) are equal, and near-duplicates when the Jaccard similarity of their
word sets is at least `NEAR_DUPLICATE_JACCARD`. Near-duplicates are found exactly with
prefix filtering: with words ordered by corpus frequency (rarest first), two sets with
Jaccard >= t must share a word among the first `|x| - ceil(t * |x|) + 1` of either set, so
only prompts that share such a rare word are compared.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence

NEAR_DUPLICATE_JACCARD = 0.8
_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)


def normalise(text: str) -> str:
    """Case-folded words without punctuation: the key for exact duplicates."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def word_set(text: str) -> frozenset[str]:
    return frozenset(normalise(text).split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _prefix_length(size: int, threshold: float) -> int:
    return size - math.ceil(threshold * size) + 1


def near_duplicate_pairs(texts: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> set[tuple[int, int]]:
    """Every pair (i, j), i < j, whose word sets have Jaccard >= threshold (exact, not sampled)."""
    sets = [word_set(t) for t in texts]
    frequency = Counter(word for s in sets for word in s)
    index: dict[str, list[int]] = defaultdict(list)
    pairs: set[tuple[int, int]] = set()
    for j, words in enumerate(sets):
        ordered = sorted(words, key=lambda w: (frequency[w], w))
        candidates: set[int] = set()
        for word in ordered[: _prefix_length(len(ordered), threshold)]:
            candidates.update(index[word])
            index[word].append(j)
        for i in candidates:
            if jaccard(sets[i], words) >= threshold:
                pairs.add((i, j))
    return pairs


def drop_cross_duplicates(groups: Sequence[Sequence[str]], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[list[int]]:
    """Indices to keep per group, in priority order: a prompt that duplicates or nearly
    duplicates a prompt of an earlier group (or an earlier prompt of its own group) is dropped.

    Groups are e.g. (held-out test, test, dev, train): the earlier group keeps the prompt.
    """
    flat: list[tuple[int, int]] = [(g, i) for g, group in enumerate(groups) for i in range(len(group))]
    texts = [groups[g][i] for g, i in flat]
    dropped: set[int] = set()
    seen: dict[str, int] = {}
    for n, text in enumerate(texts):
        key = normalise(text)
        if key in seen:
            dropped.add(n)
        else:
            seen[key] = n
    for a, b in sorted(near_duplicate_pairs(texts, threshold)):
        if a not in dropped and b not in dropped:
            dropped.add(b)  # b comes later in priority order
    keep: list[list[int]] = [[] for _ in groups]
    for n, (g, i) in enumerate(flat):
        if n not in dropped:
            keep[g].append(i)
    return keep
