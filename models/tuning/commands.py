"""CLI: `neuronguard tune`, `neuronguard deactivate` and `neuronguard eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuronguard.models.arguments import add_model_arguments
from neuronguard.models.default_data import GENERAL_TEXT_TEST, TEST_SPLIT
from neuronguard.models.tuning.settings import EvalSettings, TrainParams
from neuronguard.errors import UsageError


def _add_selection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--top-frac", type=float, help="use the top F of all the model's neurons from the set")
    group.add_argument("--k", type=int, help="use the top K neurons of the set")


def register(subparsers: argparse._SubParsersAction) -> None:
    tune = subparsers.add_parser("tune", help="SN-Tune / RSN-Tune: fine-tune only a neuron set's weights on refusal documents")
    add_model_arguments(tune, model="required")
    target = tune.add_mutually_exclusive_group(required=True)
    target.add_argument("--neurons", type=Path, help="neuron file (contrasting or importance) whose weights are tuned")
    target.add_argument("--all-params", action="store_true", help="plain full fine-tuning (baseline, downstream tasks)")
    _add_selection(tune)
    tune.add_argument("--data", type=Path, required=True, help='JSONL of {"prompt", "response"} documents')
    tune.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    tune.add_argument("--random", type=int, metavar="SEED",
                      help="tune as many random neurons per layer as the chosen set has instead (the control)")
    tune.add_argument("--exclude", type=Path, help="foundation-neuron file to leave untouched (RSN-Tune)")
    exclude = tune.add_mutually_exclusive_group()
    exclude.add_argument("--exclude-top-frac", type=float, help="use the top F of the model's neurons from --exclude")
    exclude.add_argument("--exclude-k", type=int, help="use the top K neurons of --exclude (default: all of them)")
    tune.add_argument("--lr", type=float, default=TrainParams.lr)
    tune.add_argument("--epochs", type=int, default=TrainParams.epochs)
    tune.add_argument("--batch-size", type=int, default=TrainParams.batch_size)
    tune.add_argument("--max-grad-norm", type=float, default=TrainParams.max_grad_norm)
    tune.add_argument("--max-docs", type=int, help="use the first N documents of --data")
    tune.add_argument("--retain", type=Path, help='JSONL of harmless {"prompt"} rows trained alongside --data')
    tune.add_argument("--max-retain-docs", type=int, help="use the first N rows of --retain")
    tune.add_argument("--retain-answers", choices=("self", "file"), default="self",
                      help="train on the model's own greedy answers (default) or on the file's 'response' fields")
    tune.add_argument("--retain-target-tokens", type=int,
                      help="retain loss on the first N tokens of each answer only (default: the whole answer)")
    tune.add_argument("--max-tokens", type=int, default=256, help="truncate each document to N tokens")
    tune.add_argument("--seed", type=int, default=TrainParams.seed)
    tune.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    tune.set_defaults(func=run_tune)

    deact = subparsers.add_parser("deactivate", help="zero a neuron set's rows/columns and save the checkpoint")
    add_model_arguments(deact, model="required")
    deact.add_argument("--neurons", type=Path, required=True)
    _add_selection(deact)
    deact.add_argument("--random", type=int, metavar="SEED", help="zero as many random neurons per layer instead (Deact-R)")
    deact.add_argument("--out", type=Path, required=True)
    deact.add_argument("--overwrite", action="store_true")
    deact.set_defaults(func=run_deactivate)

    ev = subparsers.add_parser("eval", help="harmful rate, false refusals and perplexity of checkpoints, side by side")
    add_model_arguments(ev, model="repeated", batch_size=EvalSettings.batch_size)
    ev.add_argument("--label", action="append", help="display name per --model, in the same order")
    ev.add_argument("--harmful", type=Path, default=TEST_SPLIT, help='JSONL with "prompt" (rows labelled harmless are skipped)')
    ev.add_argument("--harmless", type=Path, default=TEST_SPLIT, help='JSONL with "prompt" (rows labelled harmful are skipped)')
    ev.add_argument("--text", type=Path, default=GENERAL_TEXT_TEST, help='JSONL with "text", for perplexity')
    ev.add_argument("--limit", type=int, help="use the first N prompts of each kind and N texts")
    ev.add_argument("--max-new-tokens", type=int, default=EvalSettings.max_new_tokens)
    ev.add_argument("--out", type=Path, required=True, help="folder for eval.json and eval.png")
    ev.add_argument("--overwrite", action="store_true")
    ev.set_defaults(func=run_eval)


def run_tune(args: argparse.Namespace) -> int:
    from neuronguard.models.tuning.tune import ModelChoice, SetChoice, tune

    hp = TrainParams(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_grad_norm=args.max_grad_norm, seed=args.seed)
    _check_hyperparameters(hp)
    if args.random is not None and args.neurons is None:
        raise UsageError("--random needs --neurons (it draws as many random neurons per layer as that set)")
    manifest = tune(
        ModelChoice(args.model, args.device, args.dtype),
        args.data,
        args.out,
        hp,
        neurons=SetChoice(args.neurons, args.k, args.top_frac, args.random) if args.neurons else None,
        exclude=SetChoice(args.exclude, args.exclude_k, args.exclude_top_frac) if args.exclude else None,
        max_docs=args.max_docs,
        retain=args.retain,
        max_retain_docs=args.max_retain_docs,
        retain_answers=args.retain_answers,
        retain_target_tokens=args.retain_target_tokens,
        max_tokens=args.max_tokens,
        overwrite=args.overwrite,
    )
    summary = {k: manifest[k] for k in ("method", "parameters", "wall_seconds")}
    summary["metrics"] = {k: v for k, v in manifest["metrics"].items() if k != "loss_curve"}
    print(json.dumps({"out": str(args.out), **summary}, indent=2))
    return 0


def _check_hyperparameters(hp: TrainParams) -> None:
    if hp.lr <= 0 or hp.epochs <= 0 or hp.batch_size <= 0 or hp.max_grad_norm <= 0:
        raise UsageError("--lr, --epochs, --batch-size and --max-grad-norm must be positive")


def run_deactivate(args: argparse.Namespace) -> int:
    from neuronguard.models.tuning.tune import ModelChoice, SetChoice, deactivate

    manifest = deactivate(
        ModelChoice(args.model, args.device, args.dtype),
        SetChoice(args.neurons, args.k, args.top_frac),
        args.out,
        random_seed=args.random,
        overwrite=args.overwrite,
    )
    print(json.dumps({"out": str(args.out), "method": manifest["method"], **manifest["parameters"]}, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from neuronguard.models.tuning.report import EvalInputs, evaluate_checkpoints

    if args.label is not None and len(args.label) != len(args.model):
        raise UsageError(f"give one --label per --model ({len(args.model)} models, {len(args.label)} labels)")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit {args.limit} must be positive")
    report = evaluate_checkpoints(
        dict(zip(args.label or args.model, args.model)),
        EvalInputs(args.harmful, args.harmless, args.text, args.limit),
        EvalSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
        args.out,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(json.dumps({label: r["metrics"] for label, r in report["models"].items()}, indent=2))
    return 0
