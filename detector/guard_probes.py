"""Guard probes end to end: features on dev, fit, threshold, metrics on held-out test prompts.

Labels are the prompts' labels (harmful vs harmless): the unaligned organism complies with
nearly every harmful prompt, so "the generation would be harmful" equals "the prompt is
harmful" for the model the server guards. Safety-neuron probes are compared with probes on
random neurons with the same per-layer counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from neuronguard.detector.features import generated_features, last_token_features
from neuronguard.models.artifact.probe import Probe
from neuronguard.detector.probe_training import evaluate_scores, group_max, out_of_fold_auroc, roc_points, train_probe
from neuronguard.models.generation import SamplingParams
from neuronguard.models.loading import LoadedModel
from neuronguard.models.artifact.neurons import NeuronSet


@dataclass(frozen=True)
class Labeled:
    prompts: list[str]
    labels: list[int]  # 1 harmful, 0 harmless


def prefill_probe(model: LoadedModel, neurons: NeuronSet, dev: Labeled, test: Labeled, *, sha256: str, fpr: float, seed: int = 0) -> tuple[Probe, dict[str, object]]:
    """Probe on last-prompt-token activations of `neurons` (in their order); metrics on test."""
    selection = neurons.selection()
    probe = train_probe(last_token_features(model, dev.prompts, selection), torch.tensor(dev.labels),
                        neurons_sha256=sha256, position="last_prompt_token", target_fpr=fpr, seed=seed)
    scores = probe.score(last_token_features(model, test.prompts, selection)).numpy()
    labels = np.array(test.labels)
    metrics = evaluate_scores(scores, labels, probe.threshold)
    probe.metrics.update({"test": metrics})
    return probe, {**metrics, "roc": roc_points(scores, labels), "scores": scores.tolist(), "labels": labels.tolist()}


def choose_probe_k(model: LoadedModel, neurons: NeuronSet, dev: Labeled, ks: Sequence[int], *, seed: int = 0,
                   tolerance: float = 0.002) -> tuple[int, list[dict[str, float]]]:
    """The smallest k whose out-of-fold dev AUROC is within `tolerance` of the best k's.

    Fewer neurons make the guard cheaper and keep the probe on the neurons that carry the
    signal; test prompts play no part in the choice.
    """
    x = last_token_features(model, dev.prompts, neurons.top(max(ks)).selection())  # columns in file order
    y = torch.tensor(dev.labels)
    table = [{"k": k, "dev_oof_auroc": out_of_fold_auroc(x[:, :k], y, seed)} for k in tqdm(sorted(ks), desc="probe k on dev", unit="k")]
    best = max(row["dev_oof_auroc"] for row in table)
    return min(row["k"] for row in table if row["dev_oof_auroc"] >= best - tolerance), table


def probe_sweep(model: LoadedModel, neurons: NeuronSet, dev: Labeled, test: Labeled, ks: Sequence[int], seeds: Sequence[int], *, fpr: float) -> list[dict[str, object]]:
    """Test metrics of top-k and random-k (same per-layer counts) probes for each k."""
    rows = []
    for k in tqdm(ks, desc="probe sweep", unit="k"):
        top = neurons.top(k)
        _, top_metrics = prefill_probe(model, top, dev, test, sha256="sweep", fpr=fpr)
        randoms = [prefill_probe(model, top.random_like(model.sites.d_mlp, seed), dev, test, sha256="sweep", fpr=fpr)[1] for seed in seeds]
        keep = ("accuracy", "auroc", "tpr", "fpr")
        rows.append({
            "k": k,
            "top": {key: top_metrics[key] for key in keep},
            "random": [{key: r[key] for key in keep} for r in randoms],
            "random_mean": {key: float(np.mean([r[key] for r in randoms])) for key in keep},
        })
    return rows


def stream_probe(model: LoadedModel, neurons: NeuronSet, dev: Labeled, test: Labeled, *, sha256: str, fpr: float,
                 max_new_tokens: int = 32, seed: int = 0) -> tuple[Probe, dict[str, object]]:
    """Probe on the served model's activations at its own generated tokens.

    Training examples are tokens (grouped by generation for the folds); a generation is
    flagged when any token scores at or above the threshold, which is set on harmless dev
    generations for the target FPR.
    """
    selection = neurons.selection()
    params = SamplingParams(max_new_tokens=max_new_tokens)

    def tokens(data: Labeled) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        per_prompt = generated_features(model, data.prompts, selection, params)
        x = torch.cat(per_prompt)
        y = torch.cat([torch.full((len(f),), lab) for f, lab in zip(per_prompt, data.labels)])
        groups = np.concatenate([np.full(len(f), i) for i, f in enumerate(per_prompt)])
        return x, y, groups

    x_dev, y_dev, g_dev = tokens(dev)
    probe = train_probe(x_dev, y_dev, neurons_sha256=sha256, position="generated", target_fpr=fpr, groups=g_dev.tolist(), seed=seed)
    x_test, y_test, g_test = tokens(test)
    ids, maxima = group_max(probe.score(x_test).numpy(), g_test)
    labels = np.array([int(y_test[g_test == g][0]) for g in ids])
    metrics = evaluate_scores(maxima, labels, probe.threshold)
    metrics["generations_without_tokens"] = int(len(test.labels) - len(ids))
    probe.metrics.update({"test": metrics, "max_new_tokens": max_new_tokens})
    return probe, metrics
