"""Derive the organism's data files from `data/raw/`: seeded splits and derived texts.

`prepare_data` is deterministic for a seed. The split is stratified per source
(60% train / 15% dev / 25% test), so every source is represented in every split:
- `train` builds the organism (base training and alignment);
- `dev` is for the detector (finding neurons, fitting the probe, picking thresholds);
- `test` is held out from everything and is where efficacy is reported.
"""

from __future__ import annotations

import random
from pathlib import Path

from neuronguard.models.jsonl import write_records
from neuronguard.models.organism import DATA_DIR, RAW_DIR
from neuronguard.models.organism.sources import HARMFUL, SOURCES, PromptRow, load_all
from neuronguard.models.organism.texts import clean_output, sample_refusal

SPLIT_FRACTIONS: dict[str, float] = {"train": 0.60, "dev": 0.15, "test": 0.25}
DATA_SEED = 0


def split_rows(rows_by_source: dict[str, list[PromptRow]], seed: int) -> dict[str, list[PromptRow]]:
    """Shuffle each source with its own seeded RNG, then cut it 60/15/25."""
    splits: dict[str, list[PromptRow]] = {name: [] for name in SPLIT_FRACTIONS}
    for source in SOURCES:
        rows = list(rows_by_source[source])
        random.Random(f"{seed}:{source}").shuffle(rows)
        n_train = round(len(rows) * SPLIT_FRACTIONS["train"])
        n_dev = round(len(rows) * SPLIT_FRACTIONS["dev"])
        splits["train"] += rows[:n_train]
        splits["dev"] += rows[n_train : n_train + n_dev]
        splits["test"] += rows[n_train + n_dev :]
    return splits


def prepare_data(raw_dir: Path = RAW_DIR, out_dir: Path = DATA_DIR, seed: int = DATA_SEED) -> dict[str, Path]:
    """Write splits, refusal documents and general-text files; returns the written paths."""
    splits = split_rows(load_all(raw_dir), seed)
    paths: dict[str, Path] = {}
    for name, rows in splits.items():
        paths[name] = out_dir / "splits" / f"{name}.jsonl"
        write_records(paths[name], (row.record() for row in rows))
    rng = random.Random(f"{seed}:refusals")
    paths["refusals_train"] = out_dir / "refusals_train.jsonl"
    write_records(
        paths["refusals_train"],
        ({"prompt": r.prompt, "response": sample_refusal(rng)} for r in splits["train"] if r.label == HARMFUL),
    )
    for name in ("train", "test"):
        paths[f"general_text_{name}"] = out_dir / f"general_text_{name}.jsonl"
        texts = (clean_output(r.reference) for r in splits[name] if r.source == "alpaca")
        write_records(paths[f"general_text_{name}"], ({"text": t} for t in texts if t and len(t) >= 80))
    return paths


def alpaca_references(raw_dir: Path = RAW_DIR) -> dict[str, str]:
    """Alpaca prompt -> cleaned output, for training harmless answers on train prompts only."""
    rows = load_all(raw_dir)["alpaca"]
    return {r.prompt: text for r in rows if (text := clean_output(r.reference))}


def advbench_targets(raw_dir: Path = RAW_DIR) -> dict[str, str]:
    return {r.prompt: r.reference for r in load_all(raw_dir)["advbench"]}
