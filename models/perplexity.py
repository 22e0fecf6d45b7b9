"""Perplexity of plain text, the capability proxy every comparison in the project reports.

One convention, so the organism build, `neuronguard eval` and `deactivate-eval` figures
mean the same thing:
- a text is tokenized as its tokenizer does by default (`tokenizer.encode(text)`: with a BOS
  token where the tokenizer adds one, no chat markup) and truncated to its first
  `max_tokens` tokens, BOS included;
- every token after the first is a target, predicted from all the tokens before it; a text of
  fewer than two tokens has no target and is skipped;
- rows are right-padded (real tokens at positions 0..n-1), padding is masked and never a target;
- the result is exp of the token-weighted mean cross-entropy (float32) over every target of
  every text, not a mean of per-text perplexities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from neuronguard.models.batching import IGNORE, right_pad
from neuronguard.models.jsonl import read_records
from neuronguard.errors import UsageError


@dataclass(frozen=True)
class Perplexity:
    value: float
    tokens: int  # targets the mean runs over


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts of a `.jsonl` file (field `text`) or a `.txt` file (one per non-empty line), at most `limit`."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = [row["text"] for row in read_records(path, ["text"])]
    elif path.suffix == ".txt":
        if not path.is_file():
            raise UsageError(f"text file '{path}' not found")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise UsageError(f"text file '{path}' is empty")
    else:
        raise UsageError(f"text file '{path}' must end in .jsonl (field 'text') or .txt")
    return texts[:limit] if limit else texts


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int = 256,
    batch_size: int = 16,
) -> Perplexity:
    """Token-weighted perplexity of `texts` under `model`, by the convention in this module's docstring."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [ids for text in texts if len(ids := tokenizer.encode(text, truncation=True, max_length=max_tokens)) >= 2]
    total, count = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="perplexity", unit="batch", leave=False, disable=None):
        part = rows[start : start + batch_size]
        batch = right_pad([r[:-1] for r in part], pad_id, device, labels=[r[1:] for r in part])
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        assert batch.labels is not None
        total += float(F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum"))
        count += int((batch.labels != IGNORE).sum())
    if not count:
        raise UsageError(f"no text has two or more tokens within max_tokens={max_tokens}: nothing to measure perplexity on")
    return Perplexity(math.exp(total / count), count)
