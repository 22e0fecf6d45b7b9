"""What a user of the guard sees, per request: blocked or answered, and at which stage.

Each evaluation request is decoded once the way the server decodes it (greedy and sampled
at the server's default temperature); the prefill probe scores the last prompt token, the
stream probe every generated token, smoothed as the bundle says, and the shipped thresholds
decide. Rates are reported per label and benign group (plain benign, hard negatives, small
talk), per source and per attack style, beside the harmful-vs-benign AUROC of the prefill
score and of the controls (TF-IDF on the text, random-neuron probes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from neuronguard.detector.calibration import request_outcomes
from neuronguard.detector.guard_probes import Decoded, Labeled, request_scores
from neuronguard.detector.probe_training import roc_points
from neuronguard.models.artifact.probe import Probe


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def guard_table(prefill: Probe, stream: Probe, decoded: Decoded, data: Labeled) -> dict[str, object]:
    """Blocked rates (overall and by stage) per group, source and style at the shipped thresholds."""
    p, s = request_scores(prefill, stream, decoded)
    outcome = request_outcomes(p, s, prefill.threshold, stream.threshold, stream.ema_alpha)
    cells: dict[str, dict[str, list[int]]] = {"per_group": defaultdict(list), "per_source": defaultdict(list),
                                              "per_style": defaultdict(list)}
    for i, meta in enumerate(data.meta):
        label = "harmful" if data.labels[i] else "benign"
        cells["per_group"][meta.get("group", label)].append(i)
        cells["per_source"][meta["source"]].append(i)
        cells["per_style"][f"{label}/{meta.get('style', 'plain')}"].append(i)

    def rates(idx: Sequence[int]) -> dict[str, float | int]:
        idx = np.asarray(idx)
        stage = outcome["stage"][idx]
        return {"n": int(len(idx)), "blocked": float(outcome["blocked"][idx].mean()),
                "prefill": float((stage == "prefill").mean()), "stream": float((stage == "stream").mean())}

    labels = np.array(data.labels)
    benign_groups = {g for m, y in zip(data.meta, labels) if not y for g in [m.get("group", "benign")]}
    auroc = {"harmful_vs_all_benign": _auroc(p, labels)}
    for group in sorted(benign_groups):
        keep = (labels == 1) | np.array([m.get("group") == group for m in data.meta])
        auroc[f"harmful_vs_{group}"] = _auroc(p[keep], labels[keep])
    return {
        "harmful": rates(np.flatnonzero(labels == 1)) if (labels == 1).any() else None,
        "benign": rates(np.flatnonzero(labels == 0)) if (labels == 0).any() else None,
        **{kind: {k: rates(v) for k, v in sorted(table.items())} for kind, table in cells.items()},
        "prefill_auroc": auroc,
        "prefill_roc": roc_points(p, labels) if auroc["harmful_vs_all_benign"] is not None else None,
    }


def control_aurocs(text_scores: Mapping[str, np.ndarray], random_aurocs: Mapping[str, list[float]],
                   evals: Mapping[str, Labeled]) -> dict[str, object]:
    """The controls on each evaluation set: TF-IDF AUROC, and random-probe AUROC (mean, sd, max over seeds)."""
    out: dict[str, object] = {}
    for name, data in evals.items():
        values = np.array(random_aurocs[name])
        out[name] = {"tfidf_auroc": _auroc(np.asarray(text_scores[name]), np.array(data.labels)),
                     "random_probe_auroc": {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                            "max": float(values.max()), "seeds": len(values)}}
    return out
