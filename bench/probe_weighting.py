"""Does weighting the prefill probe's dev rows by group or by source make it transfer to new sources?

    python -m bench.probe_weighting            # both shipped organisms -> bench/results/probe_weighting.json

Dev holds 1,024 Alpaca requests against 96 + 30 benign look-alikes of harmful requests and 17
small-talk turns, so an unweighted logistic regression learns mostly "Alpaca or harmful", and
short small talk lands anywhere (greetings are what the held-out split blocks most). Weighting
every (label, group) or (label, source) cell of dev equally is the usual remedy. Each scheme is
judged the way the bundle build judges poolings: each dev source scored by a probe fitted on
the other dev sources (leave-one-source-out AUROC; worst benign group beside it). The held-out
split (whole sources never fitted on) is reported next to it, to show whether that dev rule
predicts transfer. Features: the shipped prefill probe's neurons (its k), last prompt token of
the served twin; the probe's own fit (standardised features, C = 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from bench.report_tables import ORGANISMS
from neuronguard.detector.features import last_token_features
from neuronguard.models.artifact.bundle import load_bundle
from neuronguard.models.jsonl import read_records
from neuronguard.models.loading import load_model
from neuronguard.models.organism import DATA_DIR
from neuronguard.models.prompts import row_request

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench/results/probe_weighting.json"
SCHEMES = ("none", "group", "source")


def cell_weights(labels: np.ndarray, cells: np.ndarray, scheme: str) -> np.ndarray:
    """Sample weights giving every cell of one label the same total (mean weight 1); `none`: all ones."""
    if scheme == "none":
        return np.ones(len(labels))
    weights = np.zeros(len(labels))
    for label in (0, 1):
        names = np.unique(cells[labels == label])
        for name in names:
            members = (cells == name) & (labels == label)
            weights[members] = 1.0 / (len(names) * members.sum())
    return weights * len(weights) / weights.sum()


def _fit_score(x: np.ndarray, y: np.ndarray, weights: np.ndarray, x_eval: np.ndarray) -> np.ndarray:
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(max_iter=5000).fit(scaler.transform(x), y, sample_weight=weights)
    return model.decision_function(scaler.transform(x_eval))


def _per_group(y: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """AUROC of every harmful request against each benign group."""
    harmful = scores[y == 1]
    return {g: float(roc_auc_score(np.r_[np.ones(len(harmful)), np.zeros(((groups == g) & (y == 0)).sum())],
                                   np.r_[harmful, scores[(groups == g) & (y == 0)]])) for g in np.unique(groups[y == 0])}


def _rows(split: str) -> list[dict]:
    return read_records(DATA_DIR / "splits" / f"{split}.jsonl", ["prompt", "label", "source", "group"])


def _labels(rows: list[dict]) -> np.ndarray:
    return np.array([int(r["label"] == "harmful") for r in rows])


def evaluate(x_dev: np.ndarray, dev: list[dict], x_held: np.ndarray, held: list[dict]) -> dict[str, dict[str, object]]:
    """Every scheme's dev leave-one-source-out and held-out AUROCs (overall and per benign group)."""
    y_dev, y_held = _labels(dev), _labels(held)
    sources = np.array([r["source"] for r in dev])
    groups = np.array([r["group"] for r in dev])
    held_groups = np.array([r["group"] for r in held])
    out: dict[str, dict[str, object]] = {}
    for scheme in SCHEMES:
        cells = sources if scheme == "source" else groups
        loso = np.zeros(len(y_dev))
        for source in np.unique(sources):
            held = sources == source
            loso[held] = _fit_score(x_dev[~held], y_dev[~held], cell_weights(y_dev[~held], cells[~held], scheme), x_dev[held])
        held_scores = _fit_score(x_dev, y_dev, cell_weights(y_dev, cells, scheme), x_held)
        dev_groups = _per_group(y_dev, loso, groups)
        out[scheme] = {"dev_leave_one_source_out_auroc": float(roc_auc_score(y_dev, loso)),
                       "dev_worst_benign_group_auroc": min(dev_groups.values()), "dev_per_benign_group": dev_groups,
                       "heldout_auroc": float(roc_auc_score(y_held, held_scores)),
                       "heldout_per_benign_group": _per_group(y_held, held_scores, held_groups)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    dev, held = _rows("dev"), _rows("heldout")
    results = {}
    for name, folder in tqdm(ORGANISMS.items(), desc="organisms", unit="organism"):
        model = load_model(folder / "unaligned")
        bundle = load_bundle(folder / "bundle", model)
        selection = bundle.neurons.top(bundle.probe.k).selection()
        x_dev, x_held = (last_token_features(model, [row_request(r) for r in rows], selection, 64).double().numpy()
                         for rows in (dev, held))
        results[name] = {"probe_k": bundle.probe.k, "schemes": evaluate(x_dev, dev, x_held, held)}
    chosen = {name: max(SCHEMES, key=lambda s: r["schemes"][s]["dev_leave_one_source_out_auroc"]) for name, r in results.items()}
    payload = {"dev_rows": len(dev), "heldout_rows": len(held), "organisms": results,
               "dev_rule_picks": chosen, "command": "python -m bench.probe_weighting"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({name: {s: {k: round(v, 3) for k, v in r["schemes"][s].items() if isinstance(v, float)}
                             for s in SCHEMES} for name, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
