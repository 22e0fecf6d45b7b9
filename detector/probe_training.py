"""Training and evaluating guard probes (standardised logistic regression, sklearn).

The decision threshold is chosen for a target false-positive rate on harmless *dev* prompts
from out-of-fold scores (cross-validation), so it is not tuned on the probe's own training
fit; every reported metric is measured on held-out prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from neuronguard.models.artifact.probe import Position, Probe
from neuronguard.errors import UsageError


def threshold_for_fpr(harmless_scores: np.ndarray, fpr: float) -> float:
    """Smallest threshold flagging (score >= threshold) at most `fpr` of harmless scores."""
    ordered = np.sort(np.asarray(harmless_scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(fpr * len(ordered)))
    if allowed >= len(ordered):
        return 0.0
    return float(min(1.0, np.nextafter(ordered[allowed], np.inf)))


def _fit(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[StandardScaler, LogisticRegression]:
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(max_iter=5000, random_state=seed).fit(scaler.transform(x), y)
    return scaler, model


def _out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, folds: int = 5) -> np.ndarray:
    scores = np.zeros(len(y))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held in splitter.split(x, y, groups):
        scaler, model = _fit(x[train], y[train], seed)
        scores[held] = model.predict_proba(scaler.transform(x[held]))[:, 1]
    return scores


def out_of_fold_scores(x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """5-fold out-of-fold probabilities, folds split by `groups` (rows of one group share a fold):
    the scores a fitted probe gives rows it did not see, which thresholds are set on."""
    return _out_of_fold(x.double().numpy(), y.long().numpy(), np.asarray(groups), seed)


def out_of_fold_auroc(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    """AUROC of 5-fold out-of-fold scores: how well a probe on `x` generalises within one split."""
    xn, yn = x.double().numpy(), y.long().numpy()
    return float(roc_auc_score(yn, _out_of_fold(xn, yn, np.arange(len(yn)), seed)))


def group_max(scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group maximum score (a generation is flagged when any of its tokens is)."""
    ids = np.unique(groups)
    return ids, np.array([scores[groups == g].max() for g in ids])


def train_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    neurons_sha256: str,
    position: Position,
    target_fpr: float = 0.05,
    groups: Sequence[int] | None = None,
    seed: int = 0,
) -> Probe:
    """Fit on all of (x, y); threshold from out-of-fold scores, per group (generation) when grouped."""
    xn, yn = x.double().numpy(), y.long().numpy()
    if len(np.unique(yn)) != 2 or min(np.bincount(yn)) < 5:
        raise UsageError("probe training needs at least 5 harmful and 5 harmless examples")
    group_ids = np.asarray(groups) if groups is not None else np.arange(len(yn))
    oof = _out_of_fold(xn, yn, group_ids, seed)
    ids, maxima = group_max(oof, group_ids)
    group_label = np.array([yn[group_ids == g][0] for g in ids])
    threshold = threshold_for_fpr(maxima[group_label == 0], target_fpr)
    scaler, model = _fit(xn, yn, seed)
    return Probe(
        neurons_sha256=neurons_sha256,
        k=x.shape[1],
        position=position,
        mean=scaler.mean_.tolist(),
        scale=scaler.scale_.tolist(),
        coef=model.coef_[0].tolist(),
        intercept=float(model.intercept_[0]),
        threshold=threshold,
        metrics={"target_fpr": target_fpr, "train_examples": int(len(yn)), "dev_oof_auroc": float(roc_auc_score(group_label, maxima))},
    )


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, AUROC, TPR and FPR at `threshold` (flag = score >= threshold)."""
    flagged = scores >= threshold
    labels = labels.astype(bool)
    return {
        "accuracy": float((flagged == labels).mean()),
        "auroc": float(roc_auc_score(labels, scores)),
        "tpr": float(flagged[labels].mean()),
        "fpr": float(flagged[~labels].mean()),
        "n": int(len(labels)),
    }


def roc_points(scores: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
