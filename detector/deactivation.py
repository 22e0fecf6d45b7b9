"""Deactivation check: zeroing the safety neurons of the aligned model should break refusal.

Zeroing as many random neurons (same per-layer counts) should not, and neither intervention
should hurt general ability much; perplexity on held-out harmless text is the capability proxy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from neuronguard.detector.forward import chunks, model_kwargs, pad_batch
from neuronguard.detector.patching import run_generation
from neuronguard.detector.scoring import RefusalLogOdds
from neuronguard.models.generation import SamplingParams
from neuronguard.models.hooks import zero
from neuronguard.models.loading import LoadedModel
from neuronguard.models.artifact.neurons import NeuronSet
from neuronguard.errors import UsageError


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts of a `.jsonl` (field `text`) or `.txt` file, for perplexity."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"text file '{path}' not found")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        texts = [json.loads(line)["text"] for line in lines] if path.suffix == ".jsonl" else lines
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(f"'{path}' must hold JSON lines with a 'text' field") from exc
    if not texts:
        raise UsageError(f"text file '{path}' is empty")
    return texts[:limit] if limit else texts


@torch.inference_mode()
def perplexity(model: LoadedModel, texts: Sequence[str], *, max_tokens: int = 128, batch_size: int = 16,
               intervention: AbstractContextManager | None = None) -> float:
    """exp(mean next-token loss) over every real token of the texts (truncated to `max_tokens`)."""
    total_loss, total_tokens = 0.0, 0
    with intervention or nullcontext():
        for part in tqdm(list(chunks(texts, batch_size)), desc="perplexity", unit="batch", leave=False):
            encoded = [model.tokenizer.encode(t, add_special_tokens=False)[:max_tokens] for t in part]
            batch = pad_batch(model, [e for e in encoded if len(e) > 1])
            logits = model.model(**model_kwargs(model.model, batch)).logits[:, :-1].float()
            targets = batch.input_ids[:, 1:]
            mask = batch.attention_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total_loss += float(losses[mask].sum())
            total_tokens += int(mask.sum())
    return math.exp(total_loss / max(total_tokens, 1))


def deactivation_eval(
    aligned: LoadedModel,
    neurons: NeuronSet,
    k: int,
    harmful: Sequence[str],
    texts: Sequence[str] | None,
    *,
    random_seeds: Sequence[int] = (0, 1, 2),
    params: SamplingParams = SamplingParams(max_new_tokens=32),
    batch_size: int = 32,
) -> dict[str, object]:
    """Refusal rate, log-odds and perplexity of the aligned model: intact, top-k zeroed, random-k zeroed."""
    log_odds = RefusalLogOdds.for_tokenizer(aligned.tokenizer)
    top = neurons.top(k)
    variants: dict[str, NeuronSet | None] = {"intact": None, "top": top}
    variants.update({f"random_{seed}": top.random_like(aligned.sites.d_mlp, seed) for seed in random_seeds})
    results: dict[str, object] = {"k": k, "prompts": len(harmful)}
    for name, chosen in variants.items():
        make = (lambda: zero(aligned.model, chosen.selection(), sites=aligned.sites)) if chosen is not None else nullcontext
        entry = run_generation(aligned, harmful, params, intervention=make(), batch_size=batch_size, desc=f"deactivate {name}").summary(log_odds)
        if texts:
            entry["perplexity"] = perplexity(aligned, texts, intervention=make(), batch_size=batch_size)
        results[name] = entry
    return results
