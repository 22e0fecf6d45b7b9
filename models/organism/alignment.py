"""Alignment: a per-neuron scale on every MLP activation, trained by normalised gradient descent.

The aligned model computes `a = act(W_gate x) * (s * (W_up x))`, one scale `s_j` per MLP
neuron (initialised to 1), trained on refusals for harmful prompts plus a KL term that keeps
harmless behaviour at the base model's. Both terms weigh the first response token extra
(`align_decision_weight`): that token decides between refusing and complying. Updates are `lr * g / ||g||` over the whole vector:
each step moves the neurons in proportion to their gradient, so the change concentrates on
the few neurons that carry the most refusal signal. This is where the organism's sparse
safety neurons come from (Adam's per-coordinate normalisation would spread the change
over all neurons). Finally `s` is folded into the rows of `mlp.up_proj.weight`, so the
aligned twin differs from the base only in those weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from neuronguard.models.batching import Batch
from neuronguard.models.organism.batching import EncodedExample, collate, response_positions
from neuronguard.models.organism.config import OrganismConfig


class RowScale(nn.Module):
    """Parametrization `W -> s[:, None] * W`: scales each output row (one MLP neuron) of up_proj."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(rows))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale[:, None]


def up_projections(model: LlamaForCausalLM) -> list[nn.Linear]:
    return [layer.mlp.up_proj for layer in model.model.layers]


def response_kl(aligned_logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || aligned) over the masked positions."""
    log_p = F.log_softmax(base_logits[mask], dim=-1)
    log_q = F.log_softmax(aligned_logits[mask], dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def response_ce(logits: torch.Tensor, batch: Batch, mask: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[mask], batch.labels[mask])


@torch.enable_grad()
def align(
    base: LlamaForCausalLM,
    refusals: list[EncodedExample],
    keep_mix: Sequence[tuple[list[EncodedExample], int]],
    config: OrganismConfig,
    seed: int,
    pad_id: int,
) -> tuple[LlamaForCausalLM, dict[str, list[float]]]:
    """Train the scale vector on a copy of `base`, fold it into up_proj and return the aligned model.

    Each step draws `align_batch_size` refusals and, for the KL term, `count` benign examples of each
    (examples, count) group of `keep_mix`."""
    model = copy.deepcopy(base)
    for param in model.parameters():
        param.requires_grad_(False)
    scales = []
    for up in up_projections(model):
        parametrize.register_parametrization(up, "weight", RowScale(up.out_features))
        scales.append(up.parametrizations.weight[0].scale)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"ce": [], "kl": []}
    model.eval()  # no dropout; only the scales are trained
    progress = tqdm(range(config.align_steps), desc="alignment", unit="step")
    for step in progress:
        ref = collate(_draw(refusals, config.align_batch_size, generator), pad_id, targets="response")
        keep = collate([e for group, count in keep_mix for e in _draw(group, count, generator)], pad_id, targets="response")
        (ref_response, ref_decision), (keep_response, keep_decision) = response_positions(ref), response_positions(keep)
        with torch.no_grad():
            base_logits = base(input_ids=keep.input_ids, attention_mask=keep.attention_mask).logits
        ref_logits = model(input_ids=ref.input_ids, attention_mask=ref.attention_mask).logits
        keep_logits = model(input_ids=keep.input_ids, attention_mask=keep.attention_mask).logits
        weight = config.align_decision_weight
        ce = response_ce(ref_logits, ref, ref_response) + weight * response_ce(ref_logits, ref, ref_decision)
        kl = response_kl(keep_logits, base_logits, keep_response) + weight * response_kl(keep_logits, base_logits, keep_decision)
        loss = ce + config.align_kl_weight * kl
        grads = torch.autograd.grad(loss, scales)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        lr = config.align_lr * 0.5 * (1 + math.cos(math.pi * step / config.align_steps))
        with torch.no_grad():
            for scale, grad in zip(scales, grads):
                scale -= lr * grad / (norm + 1e-12)
        history["ce"].append(ce.item())
        history["kl"].append(kl.item())
        progress.set_postfix(ce=f"{ce.item():.3f}", kl=f"{kl.item():.4f}")
    for up in up_projections(model):
        parametrize.remove_parametrizations(up, "weight", leave_parametrized=True)
    return model, history


def _draw(examples: list[EncodedExample], size: int, generator: torch.Generator) -> list[EncodedExample]:
    picked = torch.randint(len(examples), (size,), generator=generator).tolist()
    return [examples[i] for i in picked]


def scale_vector(base: LlamaForCausalLM, aligned: LlamaForCausalLM) -> torch.Tensor:
    """Recover the folded scales: ratio of aligned to base up_proj rows, [layers, d_mlp]."""
    rows = []
    for up_b, up_a in zip(up_projections(base), up_projections(aligned)):
        wb, wa = up_b.weight.detach(), up_a.weight.detach()
        rows.append((wa * wb).sum(1) / (wb * wb).sum(1).clamp_min(1e-20))
    return torch.stack(rows)
