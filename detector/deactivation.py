"""Deactivation check: zeroing the safety neurons of the aligned model should break refusal.

Zeroing as many random neurons (same per-layer counts) should not, and neither intervention
should hurt general ability much; perplexity on held-out harmless text is the capability proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

from neuronguard.detector.patching import run_generation
from neuronguard.detector.scoring import RefusalLogOdds
from neuronguard.detector.sweeps import RANDOM_SEEDS, spread
from neuronguard.models.generation import SamplingParams
from neuronguard.models.hooks import zero
from neuronguard.models.loading import LoadedModel
from neuronguard.models.artifact.neurons import NeuronSet
from neuronguard.models.perplexity import perplexity


def deactivation_eval(
    aligned: LoadedModel,
    neurons: NeuronSet,
    k: int,
    harmful: Sequence[str],
    texts: Sequence[str] | None,
    *,
    random_seeds: Sequence[int] = RANDOM_SEEDS,
    params: SamplingParams = SamplingParams(max_new_tokens=32),
    batch_size: int = 32,
    text_tokens: int = 128,
) -> dict[str, object]:
    """Refusal rate, log-odds and perplexity of the aligned model: intact, top-k zeroed, random-k zeroed.

    Perplexity reads the first `text_tokens` tokens of each text (`neuronguard.models.perplexity`).
    """
    log_odds = RefusalLogOdds.for_tokenizer(aligned.tokenizer)
    top = neurons.top(k)
    variants: dict[str, NeuronSet | None] = {"intact": None, "top": top}
    variants.update({f"random_{seed}": top.random_like(aligned.sites.d_mlp, seed) for seed in random_seeds})
    results: dict[str, object] = {"k": k, "prompts": len(harmful)}
    for name, chosen in variants.items():
        make = (lambda: zero(aligned.model, chosen.selection(), sites=aligned.sites)) if chosen is not None else nullcontext
        entry = run_generation(aligned, harmful, params, intervention=make(), batch_size=batch_size, desc=f"deactivate {name}").summary(log_odds)
        if texts:
            with make():
                entry["perplexity"] = perplexity(aligned.model, aligned.tokenizer, texts, max_tokens=text_tokens,
                                                 batch_size=batch_size).value
        results[name] = entry
    randoms = [results[f"random_{seed}"] for seed in random_seeds]
    results["random_spread"] = {key: spread([r[key] for r in randoms]) for key in randoms[0]} if randoms else {}
    return results
