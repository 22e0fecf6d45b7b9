"""Dev refusal rates of aligned twins built with different batch mixes, and the margin that decides between them.

    git worktree add /tmp/prev 69afb65       # the learned twin of the proportional recipe
    python -c "from dataclasses import replace; from pathlib import Path; \
      from neuronguard.models.organism.build import build_organism; from neuronguard.models.organism.config import get_config; \
      build_organism(Path('/tmp/planted_mixed'), replace(get_config('default'), align_keep_mix=(('benign', 8), \
      ('hard_negative', 4), ('small_talk', 4))), 0, base_dir=Path('models/organism/unaligned'), threads=1)"
    python -m bench.alignment_mix --twin learned_proportional=/tmp/prev/models/organism/learned/aligned \
      --twin learned_mixed=models/organism/learned/aligned \
      --twin planted_proportional=models/organism/aligned --twin planted_mixed=/tmp/planted_mixed/aligned

Greedy, 48 new tokens, the keyword judge, at most 80 dev requests per (source, style), like the
build's own evaluation but on dev, the split choices are made on. The margin, fixed before the
comparison: harmful refused minus the mean refusal rate of the three benign groups (Alpaca,
benign look-alikes of harmful requests, small talk). The larger margin ships.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuronguard.models.jsonl import read_records
from neuronguard.models.organism import DATA_DIR
from neuronguard.models.organism.build import BENIGN_GROUPS
from neuronguard.models.organism.corpus import conversation
from neuronguard.models.organism.evaluation import eval_subset, greedy_responses, refusal_report

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench/results/alignment_mix_dev.json"


def dev_rates(path: Path, rows: list[dict], name: str) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        responses = greedy_responses(model, tokenizer, [conversation(r) for r in rows], 48, 64, name)
    report = refusal_report(rows, responses)
    groups = {g: report["per_group"][g]["refusal_rate"] for g in BENIGN_GROUPS}
    return {"harmful": report["harmful_refusal_rate"], **groups,
            "margin": report["harmful_refusal_rate"] - sum(groups.values()) / len(groups)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twin", action="append", required=True, help="NAME=CHECKPOINT_DIR (repeat)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = eval_subset(read_records(DATA_DIR / "splits" / "dev.jsonl", ["prompt", "label", "source", "group"]), 80)
    twins = dict(spec.split("=", 1) for spec in args.twin)
    result = {"dev_requests": len(rows), "twins": {name: dev_rates(Path(path), rows, name) for name, path in twins.items()}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
