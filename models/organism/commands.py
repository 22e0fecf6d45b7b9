"""CLI: `neuronguard organism build` and `neuronguard organism data`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuronguard.models.organism import DATA_DIR, LEARNED_DIR, ORGANISM_DIR, RAW_DIR
from neuronguard.models.organism.config import PRESETS, get_config
from neuronguard.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    organism = subparsers.add_parser("organism", help="build the built-in unaligned/aligned model organism")
    commands = organism.add_subparsers(dest="organism_command", metavar="ACTION", required=True)

    build = commands.add_parser("build", help="train both checkpoints and write organism.json")
    build.add_argument("--recipe", choices=("planted", "learned"), default="planted",
                       help="planted: per-neuron alignment, the positive control (default); learned: full fine-tuning")
    build.add_argument("--out", type=Path, help="output folder (default: the shipped organism of the recipe: "
                       "models/organism/ or models/organism/learned/)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--threads", type=int, default=2, help="CPU threads (the shipped builds use 2)")
    build.add_argument("--config", choices=sorted(PRESETS), default="default")
    build.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder holding splits/ and general_text_test.jsonl")
    build.add_argument(
        "--base", type=Path, help="reuse this unaligned checkpoint (and its tokenizer) instead of training one"
    )
    build.add_argument("--base-steps", type=int, help="override the preset's base training steps")
    build.add_argument("--align-steps", type=int, help="override the preset's alignment steps")
    build.add_argument("--align-lr", type=float, help="override the preset's alignment step size")
    build.add_argument("--align-kl-weight", type=float, help="override the preset's KL weight on benign conversations")
    build.add_argument("--learned-steps", type=int, help="override the preset's learned-alignment steps")
    build.add_argument("--learned-lr", type=float, help="override the preset's learned-alignment learning rate")
    build.set_defaults(func=run_build)

    data = commands.add_parser("data", help="re-derive the data splits and text files from data/raw/")
    data.add_argument("--out", type=Path, default=DATA_DIR)
    data.set_defaults(func=run_data)


def run_build(args: argparse.Namespace) -> int:
    from neuronguard.models.organism.build import build_organism

    if not (args.data_dir / "splits" / "train.jsonl").is_file():
        raise UsageError(f"no data splits under {args.data_dir}: run `neuronguard organism data` first")
    if args.seed < 0:
        raise UsageError("--seed must be non-negative")
    config = get_config(args.config, base_steps=args.base_steps, align_steps=args.align_steps, align_lr=args.align_lr,
                        align_kl_weight=args.align_kl_weight, learned_steps=args.learned_steps, learned_lr=args.learned_lr)
    if args.base is not None and not (args.base / "model.safetensors").is_file():
        raise UsageError(f"--base {args.base} is not a checkpoint folder (no model.safetensors)")
    out = args.out or (ORGANISM_DIR if args.recipe == "planted" else LEARNED_DIR)
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    report = build_organism(out, config, args.seed, args.data_dir, args.base, args.recipe, args.threads)
    metrics = report["metrics"]
    summary: dict[str, object] = {
        name: {split: {k: metrics[name][split][k] for k in ("harmful_refusal_rate", "harmless_false_refusal_rate")}
               for split in ("test", "heldout")}
        for name in ("unaligned", "aligned")
    }
    summary["patch_all_max_abs_diff"] = metrics["patch_all_neurons_max_abs_logit_diff"]
    print(json.dumps({"out": str(out), "recipe": args.recipe, **summary, "timings_s": report["timings_s"]}, indent=2))
    return 0


def run_data(args: argparse.Namespace) -> int:
    from neuronguard.models.organism.data_files import prepare_data

    if not RAW_DIR.is_dir():
        raise UsageError(f"raw data folder {RAW_DIR} is missing")
    for name, path in prepare_data(RAW_DIR, args.out).items():
        print(f"{name}: {path}")
    return 0
