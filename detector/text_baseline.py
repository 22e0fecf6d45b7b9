"""The text-only baseline every probe report carries: TF-IDF words + logistic regression.

If a bag of words on the prompt text separates harmful from benign as well as the neuron
probe, the neurons add nothing the text did not already say. The baseline is fitted on the
same dev prompts as the probes (its regularisation chosen there by out-of-fold AUROC) and
scored on the same evaluation prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline

C_GRID: tuple[float, ...] = (0.1, 1.0, 10.0)


def _pipeline(c: float, seed: int) -> Pipeline:
    return make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, strip_accents="unicode"),
        LogisticRegression(C=c, max_iter=5000, random_state=seed),
    )


def fit_best_c(make: Callable[[float], Any], x: Any, labels: Sequence[int], seed: int = 0,
               grid: Sequence[float] = C_GRID) -> tuple[Any, dict[str, float]]:
    """`make(C)` refitted on all of `x` with the C of `grid` whose 5-fold out-of-fold AUROC is best."""
    y = np.asarray(labels)
    folds = StratifiedKFold(n_splits=max(2, min(5, int(np.bincount(y).min()))), shuffle=True, random_state=seed)
    table = {c: float(roc_auc_score(y, cross_val_predict(make(c), x, y, cv=folds, method="predict_proba")[:, 1]))
             for c in grid}
    best = max(table, key=lambda c: table[c])
    return make(best).fit(x, y), {"C": best, "dev_oof_auroc": table[best]}


def fit_text_baseline(texts: Sequence[str], labels: Sequence[int], seed: int = 0) -> tuple[Pipeline, dict[str, float]]:
    """The pipeline refitted on all dev texts with the C of the best 5-fold out-of-fold AUROC."""
    return fit_best_c(lambda c: _pipeline(c, seed), list(texts), labels, seed)


def score_texts(model: Pipeline, texts: Sequence[str]) -> np.ndarray:
    return model.predict_proba(list(texts))[:, 1]


def baseline_aurocs(model: Pipeline, eval_sets: Mapping[str, tuple[Sequence[str], Sequence[int]]]) -> dict[str, float | None]:
    """AUROC per named evaluation set (None where a set has only one class)."""
    out: dict[str, float | None] = {}
    for name, (texts, labels) in eval_sets.items():
        y = np.asarray(labels)
        out[name] = float(roc_auc_score(y, score_texts(model, texts))) if len(np.unique(y)) == 2 else None
    return out
