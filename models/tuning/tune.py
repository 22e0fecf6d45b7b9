"""SN-Tune / RSN-Tune / full fine-tuning and deactivation, from files to a finished checkpoint.

Both write a plain HF checkpoint (weights in the source's dtype, the source's tokenizer)
plus a JSON manifest that accounts for every changed entry, and both build it in a temp
dir that is renamed into place only when complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from neuronguard.models.generation import SamplingParams, generate_responses
from neuronguard.models.judge import is_refusal
from neuronguard.models.loading import LoadedModel, load_model
from neuronguard.models.artifact.io import file_sha256, weights_digest
from neuronguard.models.tuning.checkpoint import check_out_dir, save_checkpoint, stored_dtype
from neuronguard.models.jsonl import read_records
from neuronguard.models.tuning.documents import encode_documents
from neuronguard.models.tuning.masks import WeightMask, build_mask, parameter_count, whole_ffn_neurons
from neuronguard.models.tuning.sets import LoadedSet, load_set
from neuronguard.models.tuning.settings import TrainParams
from neuronguard.models.tuning.trainer import mean_loss, train
from neuronguard.errors import UsageError

TUNE_MANIFEST = "tune.json"
DEACTIVATE_MANIFEST = "deactivate.json"


@dataclass(frozen=True)
class SetChoice:
    """A neuron file and how much of it to use; with `random_seed`, as many random neurons per
    layer instead (the control every SN-Tune result is compared with)."""

    path: Path
    k: int | None = None
    top_frac: float | None = None
    random_seed: int | None = None


@dataclass(frozen=True)
class ModelChoice:
    path: str
    device: str = "cpu"
    dtype: str = "auto"


def _base_info(loaded: LoadedModel) -> dict[str, Any]:
    return {"path": loaded.name, "config_sha256": loaded.fingerprint, "weights_sha256": weights_digest(loaded.name)}


def _set_info(choice: SetChoice, chosen: LoadedSet) -> dict[str, Any]:
    return {
        "path": str(choice.path),
        "sha256": chosen.sha256,
        "kind": chosen.kind,
        "method": chosen.metadata.get("method"),
        "k": choice.k,
        "top_frac": choice.top_frac,
        "random_seed": choice.random_seed,
        "neurons": chosen.neurons,
    }


def _snapshot(loaded: LoadedModel, mask: WeightMask | None) -> dict[str, torch.Tensor]:
    """Host copies of the tensors that may change (all of them for full fine-tuning)."""
    params = dict(loaded.model.named_parameters())
    names = params if mask is None else dict(mask.items())
    return {name: params[name].detach().to("cpu", copy=True) for name in names}


def _changed(loaded: LoadedModel, before: dict[str, torch.Tensor], mask: WeightMask | None) -> dict[str, int]:
    """Entries that moved, per tensor; raises if anything outside the mask moved."""
    params = dict(loaded.model.named_parameters())
    changed: dict[str, int] = {}
    for name, old in before.items():
        moved = params[name].detach().cpu() != old
        if mask is not None and bool((moved & ~mask.masks[name].cpu()).any()):
            raise RuntimeError(f"entries outside the neuron mask of {name} changed: masking is broken")
        changed[name] = int(moved.sum())
    return changed


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _tuning_mask(
    loaded: LoadedModel, neurons: SetChoice, exclude: SetChoice | None
) -> tuple[WeightMask, LoadedSet, LoadedSet | None]:
    """Safety-neuron weights, minus whole foundation neurons' weights for RSN-Tune."""
    safety = load_set(neurons.path, loaded, neurons.k, neurons.top_frac, random_seed=neurons.random_seed)
    mask = build_mask(loaded, safety.rows)
    if exclude is None:
        return mask, safety, None
    foundation = load_set(exclude.path, loaded, exclude.k, exclude.top_frac)
    mask = mask.minus(build_mask(loaded, whole_ffn_neurons(foundation.rows)))
    if mask.count() == 0:
        raise UsageError(f"--exclude '{exclude.path}' removes every weight of the tuned neurons: nothing left to tune")
    return mask, safety, foundation


def tune(
    model: ModelChoice,
    data: Path,
    out: Path,
    hp: TrainParams,
    *,
    neurons: SetChoice | None,
    exclude: SetChoice | None = None,
    max_docs: int | None = None,
    retain: Path | None = None,
    max_retain_docs: int | None = None,
    retain_answers: Literal["self", "file"] = "self",
    retain_target_tokens: int | None = None,
    max_tokens: int = 256,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune the neurons' weights (all weights when `neurons` is None) and save a checkpoint.

    `retain` documents (harmless prompts) are mixed into the same shuffled batches: refusal
    documents alone also teach the tuned neurons to refuse harmless requests that look like
    harmful ones. With `retain_answers="self"` their responses are the model's own greedy
    answers, generated before tuning, so the retain loss pins harmless behaviour where it
    was. `retain_target_tokens` limits the retain loss to the opening tokens of each answer:
    that is where refusing or complying is decided, and the rest of a reference answer would
    also teach its text (and move perplexity on similar text).
    """
    started = time.perf_counter()
    out = check_out_dir(out, overwrite)
    counts = {"--max-docs": max_docs, "--max-retain-docs": max_retain_docs, "--retain-target-tokens": retain_target_tokens}
    for flag, value in counts.items():
        if value is not None and value <= 0:
            raise UsageError(f"{flag} {value} must be positive")
    if max_retain_docs is not None and retain is None:
        raise UsageError("--max-retain-docs needs --retain FILE")
    if exclude is not None and neurons is None:
        raise UsageError("--exclude needs --neurons (it removes foundation neurons from a safety-neuron set)")
    rows = read_records(data, ["prompt", "response"])[:max_docs]
    retain_keys = ["prompt"] if retain_answers == "self" else ["prompt", "response"]
    retain_rows = read_records(retain, retain_keys)[:max_retain_docs] if retain is not None else []
    loaded = load_model(model.path, model.device, model.dtype)
    mask, safety, foundation = _tuning_mask(loaded, neurons, exclude) if neurons is not None else (None, None, None)
    if retain_rows and retain_answers == "self":
        retain_rows = _own_answers(loaded, [r["prompt"] for r in retain_rows], max_tokens)
    context = min(max_tokens, loaded.context_length)
    examples = encode_documents(loaded.tokenizer, rows, context)
    if retain_rows:
        examples += encode_documents(loaded.tokenizer, retain_rows, context, retain_target_tokens)
    pad_id = loaded.tokenizer.pad_token_id
    loss_before = mean_loss(loaded.model, examples, pad_id, hp.batch_size)
    before = _snapshot(loaded, mask)
    result = train(loaded.model, examples, mask, hp, pad_id)
    loss_after = mean_loss(loaded.model, examples, pad_id, hp.batch_size)
    changed = _changed(loaded, before, mask)
    total = parameter_count(loaded.model)
    tuned = mask.count() if mask is not None else total
    manifest = {
        "format": "neuronguard.tune/1",
        "method": "full" if mask is None else ("rsn-tune" if exclude is not None else "sn-tune") + (
            "-random" if neurons is not None and neurons.random_seed is not None else ""),
        "base_model": _base_info(loaded),
        "neurons": _set_info(neurons, safety) if neurons is not None and safety is not None else None,
        "exclude": _set_info(exclude, foundation) if exclude is not None and foundation is not None else None,
        "data": {"path": str(data), "sha256": file_sha256(data), "documents": len(rows), "max_tokens": max_tokens},
        "retain": {"path": str(retain), "sha256": file_sha256(retain), "documents": len(retain_rows), "answers": retain_answers,
                   "target_tokens": retain_target_tokens}
        if retain is not None else None,
        "hyperparameters": {**hp.to_dict(), "optimizer": "Adam(weight_decay=0)", "schedule": "cosine to 0", "mask_before_clip": True},
        "parameters": {
            "model_total": total,
            "tunable_entries": tuned,
            "tunable_fraction": tuned / total,
            "changed_entries": sum(changed.values()),
            "tensors_touched": sorted(n for n, c in changed.items() if c),
        },
        "metrics": {"response_loss_before": loss_before, "response_loss_after": loss_after, "loss_curve": result.losses},
        "wall_seconds": {"train": result.seconds, "total": None},
        "versions": _versions(),
    }

    def finish() -> dict[str, Any]:
        manifest["wall_seconds"]["total"] = time.perf_counter() - started
        return manifest

    save_checkpoint(loaded.model, model.path, out, TUNE_MANIFEST, finish, stored_dtype(model.path))
    return manifest


def _own_answers(loaded: LoadedModel, prompts: list[str], max_tokens: int, new_tokens: int = 64) -> list[dict[str, str]]:
    """The model's greedy answers to `prompts` as retain documents.

    Empty answers and answers the refusal judge flags are dropped: retain documents should
    hold the model's *non*-refusing behaviour in place, not reinforce a stray refusal.
    """
    answers = generate_responses(loaded.model, loaded.tokenizer, prompts,
                                 SamplingParams(max_new_tokens=min(new_tokens, max_tokens)), batch_size=32)
    return [{"prompt": p, "response": a} for p, a in zip(prompts, answers) if a.strip() and not is_refusal(a)]


def deactivate(model: ModelChoice, neurons: SetChoice, out: Path, *, random_seed: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Zero the neurons' rows/columns (or as many random ones per layer) and save a checkpoint."""
    out = check_out_dir(out, overwrite)
    loaded = load_model(model.path, model.device, model.dtype)
    chosen = load_set(neurons.path, loaded, neurons.k, neurons.top_frac, random_seed=random_seed)
    mask = build_mask(loaded, chosen.rows)
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for name, m in mask.items():
            params[name].masked_fill_(m, 0.0)
    manifest = {
        "format": "neuronguard.deactivate/1",
        "method": "deact-r" if random_seed is not None else "deact-sn",
        "random_seed": random_seed,
        "base_model": _base_info(loaded),
        "neurons": _set_info(neurons, chosen),
        "parameters": {"model_total": parameter_count(loaded.model), "zeroed_entries": mask.count(), "tensors_touched": sorted(n for n, _ in mask.items())},
        "versions": _versions(),
    }
    save_checkpoint(loaded.model, model.path, out, DEACTIVATE_MANIFEST, lambda: manifest, stored_dtype(model.path))
    return manifest
