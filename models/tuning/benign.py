"""Benign task data for the robustness experiment: harmless Alpaca train prompts with their answers.

Downstream fine-tuning on ordinary instructions is what erodes safety in the RSN-Tune
experiment. The documents come from the organism's `train` split only (never dev/test), and
inherit Alpaca's CC BY-NC 4.0 licence (`models/organism/data/raw/LICENSE.alpaca.txt`).

Usage: `python -m neuronguard.models.tuning.benign --out runs/benign.jsonl --n 400 --seed 0`
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from neuronguard.models.default_data import TRAIN_SPLIT
from neuronguard.models.jsonl import read_records, write_records
from neuronguard.models.organism.data_files import answers as benign_answers


def benign_documents(n: int, seed: int, split: Path = TRAIN_SPLIT) -> list[dict[str, str]]:
    """`n` seeded-random harmless train prompts that have an Alpaca answer, as prompt/response."""
    answers = benign_answers()
    rows = [r for r in read_records(split, ["prompt"])
            if r.get("source") == "alpaca" and r.get("style", "plain") == "plain" and r["prompt"] in answers]
    random.Random(f"{seed}:benign").shuffle(rows)
    return [{"prompt": r["prompt"], "response": answers[r["prompt"]]} for r in rows[:n]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    docs = benign_documents(args.n, args.seed)
    write_records(args.out, docs)
    print(f"{len(docs)} benign documents -> {args.out}")


if __name__ == "__main__":
    main()
