"""Train / dev / test / held-out splits of the guard's prompts, split by row *and* by source.

- In-distribution sources are cut 60/15/25 per source into `train` (the organism), `dev`
  (the detector: neurons, probes, thresholds) and `test`.
- Held-out sources (`HELD_OUT_SOURCES`) and a quarter of the jailbreak templates never reach
  train or dev: they form `heldout`, the test a new user's traffic resembles.
- Requests that duplicate or nearly duplicate (word Jaccard >= 0.8) a request of a split
  earlier in `PRIORITY` are dropped, so no evaluated request was trained on.
- Every split also carries the attack styles of `attack_styles` (jailbreak, obfuscated,
  system message, later turn), applied to harmful and benign requests alike, each split
  with its own templates and small talk.

Records are `{"prompt", "label", "source", "group", "style"}`; when the style is not `plain`
they add `"messages"` (the chat turns) and `"request"` (the request before styling), and
`prompt` is the flattened conversation.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neuronguard.models.organism import sources as src
from neuronguard.models.organism.attack_styles import STYLES, apply_style, flatten
from neuronguard.models.organism.dedup import drop_cross_duplicates, near_duplicate_pairs, normalise
from neuronguard.models.organism.sources import PromptRow

IN_DISTRIBUTION_SOURCES: dict[str, Callable[[Path], list[PromptRow]]] = {
    "advbench": src.advbench,
    "harmbench": src.harmbench,
    "hh_redteam": src.hh_redteam,
    "harmful_strings": src.harmful_strings,
    "do_not_answer": src.do_not_answer,
    "coconot_harmful": src.coconot_harmful,
    "harmful_questions": src.harmful_questions,
    "alpaca": src.alpaca,
    "coconot_contrast": src.coconot_contrast,
    "benign_security_requests": src.benign_security_requests,
    "small_talk": src.small_talk,
}
HELD_OUT_SOURCES: dict[str, Callable[[Path], list[PromptRow]]] = {
    "catqa": src.catqa,
    "harmfulqa": src.harmfulqa,
    "cyberseceval_frr": src.cyberseceval_frr,
    "handwritten_hard_negatives": src.handwritten_hard_negatives,
    "small_talk_heldout": src.small_talk_heldout,
}
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.60, "dev": 0.15, "test": 0.25}
PRIORITY: tuple[str, ...] = ("heldout", "test", "dev", "train")


@dataclass(frozen=True)
class SplitPlan:
    """How many styled copies each split gets, and how held-out sources are capped."""

    template_max_chars: int = 800  # wrapped requests must fit the organism's training window
    heldout_template_fraction: float = 0.25
    # Probability that a request also appears once more in a random non-plain style; equal
    # across groups so that a style says nothing about the label.
    styled_harmful: float = 0.35
    styled_benign: float = 0.35
    styled_hard_negative: float = 0.35
    heldout_cap_per_source: int = 500


def _by_key(rows: list[PromptRow]) -> list[PromptRow]:
    """First occurrence of each normalised prompt, empty prompts dropped."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = " ".join(row.prompt.lower().split())
        if row.prompt and key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def _row_split(rows_by_source: dict[str, list[PromptRow]], seed: int) -> dict[str, list[PromptRow]]:
    splits: dict[str, list[PromptRow]] = {name: [] for name in SPLIT_FRACTIONS}
    for source, rows in rows_by_source.items():
        rows = list(rows)
        random.Random(f"{seed}:{source}").shuffle(rows)
        n_train = round(len(rows) * SPLIT_FRACTIONS["train"])
        n_dev = round(len(rows) * SPLIT_FRACTIONS["dev"])
        splits["train"] += rows[:n_train]
        splits["dev"] += rows[n_train : n_train + n_dev]
        splits["test"] += rows[n_train + n_dev :]
    return splits


def _record(row: PromptRow, style: str = "plain", turns: list[dict[str, str]] | None = None) -> dict[str, object]:
    record: dict[str, object] = {"prompt": row.prompt, "label": row.label, "source": row.source,
                                 "group": src.group_of(row), "style": style}
    if turns is not None:
        record["prompt"] = flatten(turns)
        record["request"] = row.prompt
        record["messages"] = turns
    return record


def _styled(rows: list[PromptRow], plan: SplitPlan, rng: random.Random, templates: list[str],
            small_talk: list[tuple[str, str]]) -> list[dict[str, object]]:
    """Each row as a plain record, and with the group's probability once more in a random style."""
    chance = {"harmful": plan.styled_harmful, "benign": plan.styled_benign,
              "hard_negative": plan.styled_hard_negative, "small_talk": 0.0}
    records = []
    for row in rows:
        records.append(_record(row))
        if rng.random() < chance[src.group_of(row)]:
            style = rng.choice(STYLES[1:])
            records.append(_record(row, style, apply_style(style, row.prompt, rng, templates, small_talk)))
    return records


def template_families(templates: list[str]) -> list[list[str]]:
    """Templates grouped with their variants (same opening, or word Jaccard >= 0.8), so a held-out
    template has no near-copy in training."""
    parent = list(range(len(templates)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    openings: dict[str, int] = {}
    links = set(near_duplicate_pairs(templates))
    for i, text in enumerate(templates):
        opening = normalise(text)[:40]
        if opening in openings:
            links.add((openings[opening], i))
        openings.setdefault(opening, i)
    for a, b in links:
        parent[root(b)] = root(a)
    families: dict[int, list[str]] = {}
    for i, text in enumerate(templates):
        families.setdefault(root(i), []).append(text)
    return list(families.values())


def build_splits(raw_dir: Path, seed: int, plan: SplitPlan = SplitPlan()) -> dict[str, list[dict[str, object]]]:
    """The four splits as records (deterministic for a seed)."""
    in_dist = {name: _by_key(loader(raw_dir)) for name, loader in IN_DISTRIBUTION_SOURCES.items()}
    rows = _row_split(in_dist, seed)
    heldout: list[PromptRow] = []
    for name, loader in HELD_OUT_SOURCES.items():
        source_rows = _by_key(loader(raw_dir))
        random.Random(f"{seed}:{name}").shuffle(source_rows)
        heldout += source_rows[: plan.heldout_cap_per_source]
    rows["heldout"] = heldout

    ordered = [rows[name] for name in PRIORITY]
    keep = drop_cross_duplicates([[r.prompt for r in group] for group in ordered])
    rows = {name: [group[i] for i in kept] for name, group, kept in zip(PRIORITY, ordered, keep)}

    families = template_families(src.jailbreak_templates(raw_dir, plan.template_max_chars))
    random.Random(f"{seed}:templates").shuffle(families)
    n_heldout = max(1, round(len(families) * plan.heldout_template_fraction))
    heldout_templates = [t for family in families[:n_heldout] for t in family]
    seen_templates = [t for family in families[n_heldout:] for t in family]

    splits: dict[str, list[dict[str, object]]] = {}
    for name in PRIORITY:
        talk_split = "test" if name == "heldout" else name  # held-out sources bring no small talk of their own
        talk = [(r.prompt, r.reference) for r in rows[talk_split] if r.source == src.SMALL_TALK]
        rng = random.Random(f"{seed}:styles:{name}")
        split_templates = heldout_templates if name == "heldout" else seen_templates
        splits[name] = _styled(rows[name], plan, rng, split_templates, talk)
    # Benign requests inside the held-out templates: a jailbreak wrapper alone must not trigger a block.
    rng = random.Random(f"{seed}:heldout-benign-jailbreaks")
    benign_test = [r for r in rows["test"] if r.source == "alpaca"]
    for row in rng.sample(benign_test, min(len(benign_test), 150)):
        splits["heldout"].append(_record(row, "jailbreak", apply_style("jailbreak", row.prompt, rng, heldout_templates, [])))
    return splits
