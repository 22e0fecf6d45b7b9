"""The masked fine-tuning loop shared by SN-Tune, RSN-Tune and plain full fine-tuning.

Why the order of operations matters:
- gradients are masked *before* clipping, so the clip norm is the norm of what is actually
  updated (clipping over the whole model first lets frozen entries shrink the update);
- Adam runs without weight decay, and masked entries get exact zero gradients from the
  first step, so their moment estimates stay zero and their update is exactly zero: every
  entry outside the mask keeps its bit pattern.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from neuronguard.models.batching import IGNORE, Batch
from neuronguard.models.tuning.documents import Example, collate
from neuronguard.models.tuning.masks import WeightMask
from neuronguard.models.tuning.settings import TrainParams


@dataclass(frozen=True)
class Trainable:
    """A parameter being tuned and, for sparse tuning, the mask of entries that may move."""

    name: str
    param: nn.Parameter
    mask: torch.Tensor | None  # bool, same shape as param; None: every entry


def trainables(model: nn.Module, mask: WeightMask | None) -> list[Trainable]:
    """Switch gradients on for the masked parameters only (all parameters when `mask` is None)."""
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    chosen = [Trainable(n, p, None) for n, p in params.items()] if mask is None else [
        Trainable(name, params[name], m) for name, m in mask.items()
    ]
    for t in chosen:
        t.param.requires_grad_(True)
    return chosen


def response_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the labelled (response) positions, and how many there were."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels
    if labels is None:
        raise ValueError("response_loss needs a batch with labels (tuning.documents.collate)")
    count = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss / max(count, 1), count


def mask_and_clip_(params: Sequence[Trainable], max_norm: float) -> float:
    """Zero the gradients outside each mask, then clip what is left; returns its norm before clipping."""
    for t in params:
        if t.mask is not None and t.param.grad is not None:
            t.param.grad = torch.where(t.mask, t.param.grad, torch.zeros_like(t.param.grad))
    grads = [t.param for t in params if t.param.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm)) if grads else 0.0


def train_step(
    model: nn.Module, batch: Batch, params: Sequence[Trainable], optimizer: torch.optim.Optimizer, max_norm: float
) -> tuple[float, float]:
    """One update; returns (loss, gradient norm of the updated entries).

    Gradients are switched on here because inference-only code in the same process may have
    disabled them globally (`torch.set_grad_enabled(False)`).
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss, _ = response_loss(model, batch)
        loss.backward()
    norm = mask_and_clip_(params, max_norm)
    optimizer.step()
    return float(loss.detach()), norm


def make_optimizer(params: Sequence[Trainable], lr: float) -> torch.optim.Optimizer:
    """Adam without weight decay: decay would move masked entries although their gradient is zero."""
    return torch.optim.Adam([t.param for t in params], lr=lr, weight_decay=0.0, foreach=False)


@torch.no_grad()
def mean_loss(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean loss over the labelled positions of `examples`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss, n = response_loss(model, collate(examples[start : start + batch_size], pad_id, device))
        total += float(loss) * n
        count += n
    return total / max(count, 1)


@dataclass
class TrainResult:
    losses: list[float]
    grad_norms: list[float]
    steps: int
    seconds: float


def train(
    model: nn.Module,
    examples: Sequence[Example],
    mask: WeightMask | None,
    hp: TrainParams,
    pad_id: int,
    *,
    optimizer_factory: Callable[[Sequence[Trainable], float], torch.optim.Optimizer] = make_optimizer,
) -> TrainResult:
    """Fine-tune `model` in place on `examples` (seeded shuffle, cosine decay, no dropout).

    The model stays in eval mode: dropout would make the sparse update depend on noise and
    break run-to-run determinism for a seed.
    """
    torch.manual_seed(hp.seed)
    device = next(model.parameters()).device
    params = trainables(model, mask)
    optimizer = optimizer_factory(params, hp.lr)
    steps_per_epoch = math.ceil(len(examples) / hp.batch_size)
    total = steps_per_epoch * hp.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    generator = torch.Generator().manual_seed(hp.seed)
    model.eval()
    losses, norms = [], []
    start = time.perf_counter()
    progress = tqdm(total=total, desc="tuning", unit="step")
    try:
        for _ in range(hp.epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for first in range(0, len(order), hp.batch_size):
                batch = collate([examples[i] for i in order[first : first + hp.batch_size]], pad_id, device)
                loss, norm = train_step(model, batch, params, optimizer, hp.max_grad_norm)
                schedule.step()
                losses.append(loss)
                norms.append(norm)
                progress.update()
                progress.set_postfix(loss=f"{loss:.3f}")
    finally:
        progress.close()
        model.requires_grad_(False)
        for t in params:
            t.param.grad = None
    return TrainResult(losses, norms, total, time.perf_counter() - start)
