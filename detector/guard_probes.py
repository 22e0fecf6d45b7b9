"""Guard probes end to end: features on dev, fit, request-level thresholds, metrics on unseen requests.

Labels are the requests' labels (harmful vs benign): the unaligned organism complies with
nearly every harmful request, so "the generation would be harmful" equals "the request is
harmful" for the model the server guards. Every probe is reported beside its controls:
probes on random neurons with the same per-layer counts (many seeds) and a TF-IDF text
classifier fitted on the same dev requests.

Thresholds are chosen for whole requests (`detector.calibration`): a benign request is
blocked if its prefill score or any smoothed stream score crosses its threshold, so both are
chosen together on out-of-fold dev scores, from generations sampled as the server samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch
from tqdm.auto import tqdm

from neuronguard.detector.calibration import RequestThresholds, choose_thresholds, tpr_at_request_fpr
from neuronguard.detector.features import decoded_features, last_token_features, pooled_features
from neuronguard.detector.probe_training import (
    evaluate_scores,
    group_max,
    out_of_fold_auroc,
    out_of_fold_scores,
    roc_points,
    train_probe,
)
from neuronguard.models.artifact.neurons import NeuronSelection, NeuronSet
from neuronguard.models.artifact.probe import Probe
from neuronguard.models.chat import Request
from neuronguard.models.generation import SamplingParams
from neuronguard.models.loading import LoadedModel


@dataclass(frozen=True)
class Labeled:
    prompts: list[Request]
    labels: list[int]  # 1 harmful, 0 benign
    meta: list[dict[str, str]] = field(default_factory=list)  # per request: source, style, group, request

    def groups(self) -> np.ndarray:
        """Fold groups: a request and its styled copies share one, so no fold sees its own request."""
        keys = [m.get("request", str(p)) for m, p in zip(self.meta, self.prompts)] if self.meta else [str(p) for p in self.prompts]
        index: dict[str, int] = {}
        return np.array([index.setdefault(k, len(index)) for k in keys])


@dataclass
class Decoded:
    """The probe neurons' activations of one decode per request: prefill row and generated tokens."""

    prefill: torch.Tensor  # [n, k]
    tokens: list[torch.Tensor]  # per request [t, k]


def decode_requests(model: LoadedModel, neurons: NeuronSet, data: Labeled, params: SamplingParams, batch_size: int) -> Decoded:
    prefill, tokens = decoded_features(model, data.prompts, neurons.selection(), params, batch_size)
    return Decoded(prefill, tokens)


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


def compare_pooling(model: LoadedModel, neurons: NeuronSet, dev: Labeled, *, seed: int) -> dict[str, float]:
    """Cross-source AUROC on dev of last-token, mean- and max-pooled prefill probes.

    Each dev source's requests are scored by a probe fitted on the other sources only, so the
    figure says how a pooling transfers to a source it never saw; held-out splits play no part.
    """
    from sklearn.metrics import roc_auc_score

    sources = np.array([m.get("source", "") for m in dev.meta])
    y = np.array(dev.labels)
    out: dict[str, float] = {}
    for pooling in ("last", "mean", "max"):
        x = pooled_features(model, dev.prompts, neurons.selection(), pooling)
        scores = np.zeros(len(y))
        for source in np.unique(sources):
            held = sources == source
            if len(np.unique(y[~held])) < 2:
                continue
            probe = train_probe(x[~held], torch.tensor(y[~held]), neurons_sha256="pooling", position="last_prompt_token", seed=seed)
            scores[held] = probe.score(x[held]).numpy()
        out[pooling] = float(roc_auc_score(y, scores))
    return out


def fit_prefill(x: torch.Tensor, dev: Labeled, *, sha256: str, seed: int) -> tuple[Probe, np.ndarray]:
    """Prefill probe on dev last-prompt-token activations, and its out-of-fold dev scores."""
    y = torch.tensor(dev.labels)
    probe = train_probe(x, y, neurons_sha256=sha256, position="last_prompt_token", seed=seed)
    return probe, out_of_fold_scores(x, y, dev.groups(), seed)


def fit_stream(tokens: list[torch.Tensor], dev: Labeled, *, sha256: str, seed: int) -> tuple[Probe, list[np.ndarray]]:
    """Stream probe on dev generated tokens (labelled by their request), and per request its
    tokens' out-of-fold scores (folds by request group, so no token is scored by a fit on its request)."""
    x = torch.cat(tokens)
    y = torch.cat([torch.full((len(t),), label) for t, label in zip(tokens, dev.labels)])
    request_group = dev.groups()
    groups = np.concatenate([np.full(len(t), request_group[i]) for i, t in enumerate(tokens)])
    probe = train_probe(x, y, neurons_sha256=sha256, position="generated", groups=groups.tolist(), seed=seed)
    oof = out_of_fold_scores(x, y, groups, seed)
    bounds = np.cumsum([0] + [len(t) for t in tokens])
    return probe, [oof[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def calibrate(prefill: Probe, stream: Probe, prefill_oof: np.ndarray, stream_oof: list[np.ndarray], dev: Labeled,
              target: float) -> tuple[RequestThresholds, dict[str, float]]:
    """Set both probes' thresholds (and the stream's smoothing) for `target` benign requests blocked on dev."""
    labels = np.array(dev.labels)
    benign = [s for s, y in zip(stream_oof, labels) if y == 0]
    harmful = [s for s, y in zip(stream_oof, labels) if y == 1]
    chosen = choose_thresholds(prefill_oof[labels == 0], benign, prefill_oof[labels == 1], harmful, target)
    prefill.threshold, stream.threshold, stream.ema_alpha = chosen.prefill, chosen.stream, chosen.ema_alpha
    curve = tpr_at_request_fpr(prefill_oof[labels == 0], benign, prefill_oof[labels == 1], harmful)
    for probe in (prefill, stream):
        probe.metrics.update({"request_target_fpr": target, "dev_request_benign_blocked": chosen.dev_benign_blocked,
                              "dev_request_harmful_blocked": chosen.dev_harmful_blocked})
    return chosen, curve


def request_scores(prefill: Probe, stream: Probe, decoded: Decoded) -> tuple[np.ndarray, list[np.ndarray]]:
    """What the server computes per request: the prefill score and every released token's stream score."""
    return (prefill.score(decoded.prefill[:, : prefill.k]).numpy(),
            [stream.score(t[:, : stream.k]).numpy() if len(t) else np.empty(0) for t in decoded.tokens])


def shared_features(model: LoadedModel, selections: Sequence[NeuronSelection], prompts: dict[str, Sequence[Request]], *,
                    max_columns: int = 65536) -> Iterator[dict[str, torch.Tensor]]:
    """Each selection's last-token features on every named prompt set, in the selections' order.

    Selections are read together, concatenated, in one pass over each prompt set (at most
    `max_columns` neurons a pass): forward passes are what costs, and each selection only
    needs its own columns of the same activations.
    """
    def read(chunk: list[NeuronSelection]) -> Iterator[dict[str, torch.Tensor]]:
        union = NeuronSelection(torch.cat([c.layers for c in chunk]), torch.cat([c.indices for c in chunk]))
        features = {name: last_token_features(model, part, union) for name, part in prompts.items()}
        offset = 0
        for selection in chunk:
            cols = slice(offset, offset + len(selection))
            offset += len(selection)
            yield {name: x[:, cols] for name, x in features.items()}

    chunk: list[NeuronSelection] = []
    for selection in selections:
        if chunk and sum(map(len, chunk)) + len(selection) > max_columns:
            yield from read(chunk)
            chunk = []
        chunk.append(selection)
    if chunk:
        yield from read(chunk)


def _sweep_sets(model: LoadedModel, neurons: NeuronSet, ks: Sequence[int], seeds: Sequence[int]) -> list[tuple[int, NeuronSelection]]:
    """The sweep's probes in order: for each k the top-k set, then one random-k set per seed."""
    return [(k, chosen.selection()) for k in ks for chosen in
            [neurons.top(k), *(neurons.top(k).random_like(model.sites.d_mlp, s) for s in seeds)]]


def _sweep_rows(sets: Sequence[tuple[int, NeuronSelection]], features: Iterator[dict[str, torch.Tensor]], dev: Labeled,
                test: Labeled, ks: Sequence[int], *, fpr: float, test_key: str) -> list[dict[str, object]]:
    keep = ("accuracy", "auroc", "tpr", "fpr")
    results: dict[int, list[dict[str, float]]] = {k: [] for k in ks}
    for (k, _), x in tqdm(zip(sets, features), total=len(sets), desc="probe sweep", unit="probe"):
        probe = train_probe(x["dev"], torch.tensor(dev.labels), neurons_sha256="sweep", position="last_prompt_token",
                            target_fpr=fpr)
        results[k].append(evaluate_scores(probe.score(x[test_key]).numpy(), np.array(test.labels), probe.threshold))
    rows = []
    for k in ks:
        top, randoms = results[k][0], results[k][1:]
        rows.append({"k": k, "top": {key: top[key] for key in keep},
                     "random": [{key: r[key] for key in keep} for r in randoms],
                     "random_mean": {key: float(np.mean([r[key] for r in randoms])) for key in keep}})
    return rows


def probe_sweep(model: LoadedModel, neurons: NeuronSet, dev: Labeled, test: Labeled, ks: Sequence[int], seeds: Sequence[int], *,
                fpr: float) -> list[dict[str, object]]:
    """Test metrics of top-k and random-k (same per-layer counts) prefill probes for each k (per-probe thresholds)."""
    sets = _sweep_sets(model, neurons, ks, seeds)
    features = shared_features(model, [selection for _, selection in sets], {"dev": dev.prompts, "test": test.prompts})
    return _sweep_rows(sets, features, dev, test, ks, fpr=fpr, test_key="test")


def _random_selections(model: LoadedModel, neurons: NeuronSet, seeds: Sequence[int]) -> list[NeuronSelection]:
    return [neurons.random_like(model.sites.d_mlp, s).selection() for s in seeds]


def _random_aurocs(features: Iterator[dict[str, torch.Tensor]], count: int, dev: Labeled, evals: dict[str, Labeled], *,
                   seed: int) -> dict[str, list[float]]:
    """AUROC on each eval set of a probe fitted on dev, for the next `count` feature sets of `features`."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, list[float]] = {name: [] for name in evals}
    for x in tqdm(islice(features, count), total=count, desc="random probes", unit="seed"):
        probe = train_probe(x["dev"], torch.tensor(dev.labels), neurons_sha256="random", position="last_prompt_token", seed=seed)
        for name, data in evals.items():
            out[name].append(float(roc_auc_score(data.labels, probe.score(x[f"eval:{name}"]).numpy())))
    return out


def random_probe_aurocs(model: LoadedModel, neurons: NeuronSet, dev: Labeled, evals: dict[str, Labeled],
                        seeds: Sequence[int], *, seed: int, max_columns: int = 65536) -> dict[str, list[float]]:
    """Held-out AUROC of prefill probes on random neurons with the probe's per-layer counts, one per seed
    (the seeds' sets read in shared passes: `shared_features`)."""
    selections = _random_selections(model, neurons, seeds)
    prompts = {"dev": dev.prompts, **{f"eval:{name}": data.prompts for name, data in evals.items()}}
    features = shared_features(model, selections, prompts, max_columns=max_columns)
    return _random_aurocs(features, len(selections), dev, evals, seed=seed)


def random_controls_and_sweep(model: LoadedModel, neurons: NeuronSet, probe_k: int, dev: Labeled, evals: dict[str, Labeled],
                              seeds: Sequence[int], ks: Sequence[int], sweep_seeds: Sequence[int], *, fpr: float, seed: int,
                              sweep_split: str = "test", max_columns: int = 65536,
                              ) -> tuple[dict[str, list[float]], list[dict[str, object]]]:
    """`random_probe_aurocs(neurons.top(probe_k), ...)` and `probe_sweep(..., evals[sweep_split], ...)` in the
    same shared passes: both read last-token features of dev and of the same evaluation prompts, so one
    forward pass per prompt set (and column chunk) serves every random set and every sweep set.
    The results are those of the two calls made apart (the same batches, each set its own columns)."""
    randoms = _random_selections(model, neurons.top(probe_k), seeds)
    sets = _sweep_sets(model, neurons, ks, sweep_seeds)
    prompts = {"dev": dev.prompts, **{f"eval:{name}": data.prompts for name, data in evals.items()}}
    features = shared_features(model, [*randoms, *(selection for _, selection in sets)], prompts, max_columns=max_columns)
    random_aurocs = _random_aurocs(features, len(randoms), dev, evals, seed=seed)
    sweep = _sweep_rows(sets, features, dev, evals[sweep_split], ks, fpr=fpr, test_key=f"eval:{sweep_split}")
    return random_aurocs, sweep


# Single probes with per-probe thresholds (`neuronguard probe train`); bundles use `calibrate`.
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
        per_prompt = decoded_features(model, data.prompts, selection, params)[1]
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
