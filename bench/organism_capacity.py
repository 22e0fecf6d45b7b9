"""Does a larger organism carry intent? Held-out-source AUROC of probes on its own activations.

    python -m bench.organism_capacity --config default large --seeds 0 1 --threads 1
    python -m bench.organism_capacity --config default --seeds 0 --base-steps 500   # less training, same shape
    python -m bench.organism_capacity --checkpoint models/organism/unaligned --label shipped --append

For each organism preset and seed it trains the base (unaligned) model from scratch as
`neuronguard organism build` does (same train split, same steps unless `--base-steps`). On
its MLP activations at the last prompt token of the chat-rendered dev requests it fits
logistic-regression probes, on every neuron and on each layer alone (standardised; C chosen by
5-fold out-of-fold AUROC on dev), and scores them on the whole held-out split: held-out
sources and jailbreak families, harmful against every benign request. A TF-IDF classifier
fitted on the same dev requests is the text-only baseline. Nothing is chosen on the held-out
split. These are probes on all neurons of the base, not the shipped guard (its safety neurons,
its thresholds): they measure what the organism's activations carry.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.text_encoder_baseline import request_text
from neuronguard.detector.features import last_token_features
from neuronguard.detector.text_baseline import fit_best_c, fit_text_baseline, score_texts
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.jsonl import read_records
from neuronguard.models.loading import LoadedModel, load_model
from neuronguard.models.organism import DATA_DIR
from neuronguard.models.organism.build import SPLIT_KEYS, train_base_model
from neuronguard.models.organism.config import get_config
from neuronguard.models.prompts import row_request

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench/results/organism_capacity.json"
PROBE_C = (0.001, 0.01, 0.1)  # standardised activations of 1,000s of neurons need strong regularisation


def _rows(split: str) -> list[dict[str, Any]]:
    return read_records(DATA_DIR / "splits" / f"{split}.jsonl", ["prompt", "label"])


def _labels(rows: list[dict[str, Any]]) -> np.ndarray:
    return np.array([int(r["label"] == "harmful") for r in rows])


def _probe(c: float) -> Any:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))


def probe_aurocs(model: LoadedModel, dev: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Dev out-of-fold and held-out AUROC of probes on every neuron ("all") and on each layer ("L0", ...)."""
    selection = NeuronSelection.all(model.sites)
    x_dev = last_token_features(model, [row_request(r) for r in dev], selection).numpy()
    x_held = last_token_features(model, [row_request(r) for r in heldout], selection).numpy()
    y_dev, y_held = _labels(dev), _labels(heldout)
    layers = selection.layers.numpy()
    columns = {"all": np.arange(x_dev.shape[1])} | {f"L{layer}": np.flatnonzero(layers == layer) for layer in np.unique(layers)}
    out = {}
    for name, cols in columns.items():
        probe, info = fit_best_c(_probe, x_dev[:, cols], y_dev, grid=PROBE_C)
        held = float(roc_auc_score(y_held, probe.predict_proba(x_held[:, cols])[:, 1]))
        out[name] = {"C": info["C"], "dev_oof_auroc": round(info["dev_oof_auroc"], 4), "heldout_auroc": round(held, 4)}
    return out


def trained(config_name: str, seed: int, base_steps: int | None, folder: Path) -> tuple[LoadedModel, dict[str, Any]]:
    """A freshly trained base organism, saved to `folder` and loaded back as the server would load it."""
    config = get_config(config_name, base_steps=base_steps)
    start = time.perf_counter()
    train = read_records(DATA_DIR / "splits" / "train.jsonl", SPLIT_KEYS)
    tokenizer, base, losses, _ = train_base_model(train, config, seed)
    seconds = time.perf_counter() - start
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"config": config_name, "seed": seed, "base_steps": config.base_steps,
            "parameters": sum(p.numel() for p in base.parameters()), "train_s": round(seconds, 1),
            "base_final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None}
    return load_model(folder), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["default", "large"], help="organism presets to train")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--base-steps", type=int, help="override the presets' base training steps")
    parser.add_argument("--checkpoint", type=Path, nargs="+", help="measure these checkpoints instead of training")
    parser.add_argument("--label", nargs="+", help="a name for each --checkpoint (what it is, how it was trained)")
    parser.add_argument("--append", action="store_true", help="add the results to those already in --out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.checkpoint and len(args.label or []) != len(args.checkpoint):
        parser.error("give one --label per --checkpoint")
    torch.set_num_threads(args.threads)
    dev, heldout = _rows("dev"), _rows("heldout")
    text_model, text_info = fit_text_baseline([request_text(r) for r in dev], _labels(dev))
    text_held = float(roc_auc_score(_labels(heldout), score_texts(text_model, [request_text(r) for r in heldout])))
    results = []
    if args.checkpoint:
        for path, label in zip(args.checkpoint, args.label):
            model = load_model(path)
            results.append({"checkpoint": label, "parameters": sum(p.numel() for p in model.model.parameters()),
                            "probes": probe_aurocs(model, dev, heldout)})
    else:
        for config_name in args.config:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as folder:
                    model, info = trained(config_name, seed, args.base_steps, Path(folder))
                    results.append(info | {"probes": probe_aurocs(model, dev, heldout)})
                print(json.dumps(results[-1]), flush=True)
    splits = {"dev": len(dev), "heldout": len(heldout)}
    if args.append and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        if earlier["splits"] != splits:
            raise SystemExit(f"{args.out} was measured on other splits ({earlier['splits']}): write a new file")
        results = earlier["results"] + results
    report = {
        "splits": splits,
        "tfidf": {"C": text_info["C"], "dev_oof_auroc": round(text_info["dev_oof_auroc"], 4), "heldout_auroc": round(text_held, 4)},
        "threads": args.threads,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
