"""Derive the organism's data files from `data/raw/`: the splits and the texts built from them.

`prepare_data` is deterministic for a seed (see `splits` for how rows and sources are split):
- `train` builds the organism (base training and alignment);
- `dev` is for the detector (finding neurons, fitting the probes, picking thresholds);
- `test` is held out from everything; `heldout` holds whole sources and jailbreak templates
  that neither the organism nor the detector ever saw: where efficacy is reported.
"""

from __future__ import annotations

import random
from pathlib import Path

from neuronguard.models.jsonl import write_records
from neuronguard.models.organism import DATA_DIR, RAW_DIR
from neuronguard.models.organism import sources as src
from neuronguard.models.organism.splits import build_splits
from neuronguard.models.organism.texts import clean_output, sample_refusal

DATA_SEED = 0
SPLITS: tuple[str, ...] = ("train", "dev", "test", "heldout")


def prepare_data(raw_dir: Path = RAW_DIR, out_dir: Path = DATA_DIR, seed: int = DATA_SEED) -> dict[str, Path]:
    """Write the splits, refusal documents and general-text files; returns the written paths."""
    splits = build_splits(raw_dir, seed)
    paths: dict[str, Path] = {}
    for name in SPLITS:
        paths[name] = out_dir / "splits" / f"{name}.jsonl"
        write_records(paths[name], splits[name])
    rng = random.Random(f"{seed}:refusals")
    paths["refusals_train"] = out_dir / "refusals_train.jsonl"
    write_records(paths["refusals_train"], (
        {"prompt": r["prompt"], "response": sample_refusal(rng)}
        for r in splits["train"] if r["label"] == src.HARMFUL and r["style"] == "plain"
    ))
    references = answers(raw_dir)
    for name in ("train", "test"):
        paths[f"general_text_{name}"] = out_dir / f"general_text_{name}.jsonl"
        texts = (references.get(str(r["prompt"])) for r in splits[name] if r["source"] == "alpaca" and r["style"] == "plain")
        write_records(paths[f"general_text_{name}"], ({"text": t} for t in texts if t and len(t) >= 80))
    return paths


def answers(raw_dir: Path = RAW_DIR) -> dict[str, str]:
    """Benign request -> a helpful answer (Alpaca output, CoCoNot's preferred answer, the handwritten
    answer), for training answers on train requests only; answers that trip the judge are dropped."""
    rows = (src.alpaca(raw_dir) + src.coconot_contrast(raw_dir) + src.benign_security_requests(raw_dir)
            + src.small_talk(raw_dir))
    return {r.prompt: text for r in rows if (text := clean_output(r.reference))}


def advbench_targets(raw_dir: Path = RAW_DIR) -> dict[str, str]:
    return {r.prompt: r.reference for r in src.advbench(raw_dir)}
