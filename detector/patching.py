"""Dynamic activation patching: how much safety do the chosen neurons carry?

The unaligned model generates while the chosen neurons take the aligned model's values at
every step (both models keep KV caches: `models.generation.decode` with a `PatchSource`).
Each neuron set is scored by refusal rate and refusal log-odds (`detector.scoring`) and by
restoration `(patched - unaligned) / (aligned - unaligned)`; random sets with the same
per-layer counts are the baseline. Two sanity checks run every time: patching all neurons
reproduces the aligned model, and self-patching reproduces the unpatched model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from neuronguard.detector.forward import chunks, pad_batch
from neuronguard.detector.sweeps import DEFAULT_FRACTIONS, RANDOM_SEEDS, spread
from neuronguard.detector.scoring import RefusalLogOdds, restoration
from neuronguard.models.chat import encode_prompt
from neuronguard.models.generation import PatchSource, SamplingParams, decode, stop_ids
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.judge import refusal_rate
from neuronguard.models.loading import LoadedModel
from neuronguard.models.artifact.neurons import NeuronSet
from neuronguard.models.sites import resolve_sites


@dataclass
class Generation:
    """Responses of one model configuration with their first-position logits."""

    token_ids: list[list[int]]
    texts: list[str]
    first_logits: torch.Tensor  # [n, vocab] float32 (cpu)

    def summary(self, log_odds: RefusalLogOdds) -> dict[str, float]:
        return {"refusal_rate": refusal_rate(self.texts), "log_odds": float(log_odds(self.first_logits).mean())}


def run_generation(
    model: LoadedModel,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    patch_from: LoadedModel | None = None,
    selection: NeuronSelection | None = None,
    intervention: AbstractContextManager | None = None,
    batch_size: int = 32,
    desc: str = "generating",
) -> Generation:
    """Generate for `prompts`, optionally patching `selection` from `patch_from` or inside `intervention`."""
    if not params.stop_token_ids:
        params = SamplingParams(**{**params.__dict__, "stop_token_ids": stop_ids(model.tokenizer, model.model)})
    source = PatchSource(patch_from.model, selection, patch_from.sites) if patch_from is not None and selection is not None else None
    token_ids: list[list[int]] = []
    first: list[torch.Tensor] = []
    with intervention or nullcontext():
        for part in tqdm(list(chunks(prompts, batch_size)), desc=desc, unit="batch", leave=False):
            batch = pad_batch(model, [encode_prompt(model.tokenizer, p) for p in part])
            rows: list[list[int]] = [[] for _ in part]
            done = [False] * len(part)
            for step in decode(model.model, batch, params, sites=model.sites, patch_source=source):
                if step.index == 0:
                    first.append(step.logits.cpu())
                for row, token in enumerate(step.tokens.tolist()):
                    if not done[row]:
                        done[row] = token in params.stop_token_ids
                        if not done[row]:
                            rows[row].append(token)
            token_ids += rows
    texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    return Generation(token_ids, texts, torch.cat(first))


def sanity_checks(aligned: LoadedModel, unaligned: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 16) -> dict[str, object]:
    """Patch-all must generate like the aligned model; self-patch like the unpatched one."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    everything = NeuronSelection.all(unaligned.sites)
    plain_u = run_generation(unaligned, prompts, params, desc="sanity: unaligned")
    plain_a = run_generation(aligned, prompts, params, desc="sanity: aligned")
    patch_all = run_generation(unaligned, prompts, params, patch_from=aligned, selection=everything, desc="sanity: patch all")
    twin = LoadedModel(copy.deepcopy(unaligned.model), unaligned.tokenizer, unaligned.sites, unaligned.name, unaligned.fingerprint)
    twin.sites = resolve_sites(twin.model)  # a patch source must be a separate module: hooks are per module
    self_patch = run_generation(unaligned, prompts, params, patch_from=twin, selection=everything, desc="sanity: self-patch")
    del twin
    return {
        "prompts": len(prompts),
        "patch_all_equals_aligned": patch_all.token_ids == plain_a.token_ids,
        "patch_all_max_logit_diff": float((patch_all.first_logits - plain_a.first_logits).abs().max()),
        "self_patch_equals_unpatched": self_patch.token_ids == plain_u.token_ids,
        "self_patch_max_logit_diff": float((self_patch.first_logits - plain_u.first_logits).abs().max()),
    }


def _with_restoration(summary: dict[str, float], base_u: dict[str, float], base_a: dict[str, float]) -> dict[str, object]:
    return {
        **summary,
        "restoration_log_odds": restoration(summary["log_odds"], base_u["log_odds"], base_a["log_odds"]),
        "restoration_refusal": restoration(summary["refusal_rate"], base_u["refusal_rate"], base_a["refusal_rate"]),
    }


def patch_sweep(
    aligned: LoadedModel,
    unaligned: LoadedModel,
    neurons: NeuronSet,
    prompts: Sequence[str],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    random_seeds: Sequence[int] = RANDOM_SEEDS,
    params: SamplingParams = SamplingParams(max_new_tokens=32),
    batch_size: int = 32,
) -> dict[str, object]:
    """Top-k and random-k patching at each fraction of all neurons, with baselines."""
    log_odds = RefusalLogOdds.for_tokenizer(unaligned.tokenizer)
    total = unaligned.sites.num_neurons
    run = lambda **kw: run_generation(unaligned, prompts, params, batch_size=batch_size, **kw).summary(log_odds)  # noqa: E731
    base_u = run(desc="unaligned")
    base_a = run_generation(aligned, prompts, params, batch_size=batch_size, desc="aligned").summary(log_odds)
    rows = []
    for fraction in tqdm(fractions, desc="patch sweep", unit="k"):
        top = neurons.top_fraction(fraction, total)
        entry: dict[str, object] = {"fraction": fraction, "k": len(top)}
        entry["top"] = _with_restoration(run(patch_from=aligned, selection=top.selection(), desc=f"top {len(top)}"), base_u, base_a)
        randoms = [
            _with_restoration(run(patch_from=aligned, selection=top.random_like(unaligned.sites.d_mlp, seed).selection(), desc=f"random {len(top)}"), base_u, base_a)
            for seed in random_seeds
        ]
        entry["random"] = randoms
        entry["random_mean"] = {key: _mean([r[key] for r in randoms]) for key in randoms[0]}
        entry["random_spread"] = {key: spread([r[key] for r in randoms]) for key in ("restoration_log_odds", "restoration_refusal")}
        rows.append(entry)
    return {
        "prompts": len(prompts),
        "sampling": {"temperature": params.temperature, "top_p": params.top_p, "seed": params.seed, "max_new_tokens": params.max_new_tokens},
        "unaligned": base_u,
        "aligned": base_a,
        "sweep": rows,
    }


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
