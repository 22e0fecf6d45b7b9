"""Learned alignment: ordinary fine-tuning of every parameter, and the benign fine-tune that erodes it.

Unlike the planted recipe (`alignment`), nothing here targets individual neurons: AdamW
updates every weight of the model (attention, MLP, norms, embeddings) on refusals for
harmful train conversations mixed with helpful answers to benign ones. Whether safety then
concentrates in a few MLP neurons is what the detector measures, not something built in.

`erode` is the product's real scenario: the aligned model fine-tuned on ordinary benign
instructions, which wears its refusals down.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from neuronguard.models.organism.batching import EncodedExample, collate
from neuronguard.models.organism.training import adamw_step, cosine_lr


@torch.enable_grad()
def finetune(
    start: LlamaForCausalLM,
    mix: Sequence[tuple[list[EncodedExample], int]],
    *,
    steps: int,
    lr: float,
    warmup: int,
    seed: int,
    pad_id: int,
    desc: str,
) -> tuple[LlamaForCausalLM, list[float]]:
    """A fine-tuned copy of `start`: each batch draws (examples, count) `count` examples from every group of
    `mix`, so a small group (small talk) weighs what the recipe says, not what its size says; loss on answers only."""
    model = copy.deepcopy(start)
    for param in model.parameters():
        param.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses: list[float] = []
    model.train()
    progress = tqdm(range(steps), desc=desc, unit="step")
    for step in progress:
        picked = [g[i] for g, count in mix for i in torch.randint(len(g), (count,), generator=generator).tolist()]
        batch = collate(picked, pad_id, targets="response")
        losses.append(adamw_step(model, optimizer, batch, cosine_lr(step, steps, lr, warmup)))
        if step % 10 == 0:
            progress.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return model, losses


def parameter_change(before: LlamaForCausalLM, after: LlamaForCausalLM) -> dict[str, float]:
    """Relative Frobenius change ||W_after - W_before|| / ||W_before|| per parameter type
    (e.g. `self_attn.q_proj.weight`, `mlp.up_proj.weight`), over all layers."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    after_params = dict(after.named_parameters())
    for name, param in before.named_parameters():
        kind = ".".join(p for p in name.split(".") if not p.isdigit() and p not in ("model", "layers"))
        num[kind] = num.get(kind, 0.0) + float((after_params[name].detach() - param.detach()).pow(2).sum())
        den[kind] = den.get(kind, 0.0) + float(param.detach().pow(2).sum())
    return {kind: (num[kind] / den[kind]) ** 0.5 if den[kind] else 0.0 for kind in sorted(num)}
