"""Padded token batches: the one input shape of every batched forward pass in the project.

Two paddings, one type:
- left padding (decoding, read-outs): every row's last real token sits at position -1, and
  the position ids come from the attention mask so padding does not shift a row's positions;
- right padding (teacher forcing, perplexity): real tokens sit at 0..n-1 and the padding after
  them is never attended to, so no position ids are needed; `labels` holds each position's
  target, already shifted, and `IGNORE` elsewhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

IGNORE = -100  # cross_entropy's ignore_index: positions without a target


@dataclass
class Batch:
    input_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor  # [b, s], 1 on real tokens
    lengths: list[int] = field(default_factory=list)  # real tokens per row
    labels: torch.Tensor | None = None  # [b, s] target of each position, IGNORE where there is none


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Left padding keeps every row's last token at position -1 (where decoding reads)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return Batch(ids.to(device), mask.to(device), [len(s) for s in sequences])


def right_pad(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
    labels: Sequence[Sequence[int]] | None = None,
) -> Batch:
    """Right padding for teacher forcing; `labels[i]` (as long as row i) are its targets."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE, dtype=torch.long) if labels is not None else None
    for row, seq in enumerate(sequences):
        n = len(seq)
        ids[row, :n] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, :n] = 1
        if targets is not None and labels is not None:
            if len(labels[row]) != n:
                raise ValueError(f"row {row}: {len(labels[row])} labels for {n} tokens")
            targets[row, :n] = torch.as_tensor(list(labels[row]), dtype=torch.long)
    return Batch(ids.to(device), mask.to(device), [len(s) for s in sequences],
                 targets.to(device) if targets is not None else None)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each real token's index within its own row (padding gets 0): [b, s] -> [b, s]."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def accepts_position_ids(module: nn.Module) -> bool:
    """Whether `module.forward` takes `position_ids` (OPT, for one, computes them itself)."""
    return "position_ids" in inspect.signature(module.forward).parameters


def forward_kwargs(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Inputs of one full forward pass over `batch`, with position ids where the model takes them."""
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if accepts_position_ids(model):
        kwargs["position_ids"] = position_ids(batch.attention_mask)
    return kwargs
