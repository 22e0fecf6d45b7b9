"""Detector CLI: identify, patch-eval, deactivate-eval, probe train, compare, bundle build.

Building the parser imports no torch: the science modules load inside the command functions.
`identify` and `probe train` also run under `torchrun --nproc-per-node N`: the ranks split the
prompts and rank 0 alone writes and reports; the other commands refuse torchrun.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from neuronguard.detector.sweeps import DEFAULT_FRACTIONS, RANDOM_SEEDS
from neuronguard.models.arguments import MODEL_HELP, add_model_arguments, load_from_args
from neuronguard.models.artifact.io import file_sha256, write_json
from neuronguard.models.default_data import DEV_SPLIT, HELDOUT_SPLIT, TEST_SPLIT
from neuronguard.errors import UsageError

if TYPE_CHECKING:
    from neuronguard.models.artifact.neurons import NeuronSet
    from neuronguard.models.loading import LoadedModel

BATCH_SIZE = 16
POSITIONS = ("completion", "prompt", "all", "last")  # the values of detector.contrasting.Positions


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from exc
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got '{text}'")
    return values


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from exc


def _pair_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aligned", required=True, help="aligned model: " + MODEL_HELP)
    parser.add_argument("--unaligned", required=True, help="unaligned model (the served one): " + MODEL_HELP)


def _sweep_args(parser: argparse.ArgumentParser, fractions: bool = True) -> None:
    if fractions:
        parser.add_argument("--fractions", type=_floats, default=list(DEFAULT_FRACTIONS),
                            help=f"neuron-set sizes as shares of all MLP neurons (default: {_joined(DEFAULT_FRACTIONS)})")
    parser.add_argument("--seeds", type=_ints, default=list(RANDOM_SEEDS),
                        help=f"seeds of the random control sets (default: {_joined(RANDOM_SEEDS)})")


def _joined(values: tuple[float, ...] | tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def _prompt_args(parser: argparse.ArgumentParser, flag: str = "--prompts", required: bool = True) -> None:
    parser.add_argument(flag, required=required, type=Path, help=".txt (one per line), .jsonl (field 'prompt') or .csv")
    parser.add_argument("--label", help="skip .jsonl rows that carry another label (e.g. --label harmful)")
    parser.add_argument("--column", help="CSV column (default: first of prompt, goal, Behavior)")
    parser.add_argument("--num-prompts", type=int, help="use at most this many prompts (the first ones)")


def _pair(args: argparse.Namespace) -> tuple[LoadedModel, LoadedModel]:
    from neuronguard.models.loading import assert_same_architecture

    aligned, unaligned = load_from_args(args.aligned, args), load_from_args(args.unaligned, args)
    assert_same_architecture(aligned, unaligned)
    return aligned, unaligned


def _prompts(args: argparse.Namespace, flag: str = "prompts") -> list[str]:
    from neuronguard.models.prompts import read_prompts

    return read_prompts(getattr(args, flag), label=args.label, column=args.column, limit=args.num_prompts)[0]


def _mlp_neurons(path: Path, model: LoadedModel) -> NeuronSet:
    from neuronguard.models.artifact.neurons import MLP_SITE, NeuronSet

    neurons = NeuronSet.load(path, model)
    if neurons.metadata.get("site") != MLP_SITE:
        raise UsageError(f"'{path}' holds weight-row neurons (site {neurons.metadata.get('site')}): patching and probes need MLP neurons")
    return neurons


def _k(neurons: NeuronSet, k: int | None, fraction: float | None, total: int) -> int:
    if k is not None:
        return len(neurons.top(k))
    return len(neurons.top_fraction(fraction if fraction is not None else 0.05, total))


def _one_process(command: str) -> None:
    """A command that does not split its work would run N times and write the same files N times."""
    from neuronguard.models.distributed import launched

    if launched():
        raise UsageError(f"{command} runs in one process: start it without torchrun "
                         "(identify and probe train split their prompts over torchrun ranks)")


def cmd_identify(args: argparse.Namespace) -> int:
    from neuronguard.models.distributed import process_group

    with process_group(args.device) as device:
        args.device = device
        return _identify(args)


def _identify(args: argparse.Namespace) -> int:
    from neuronguard.models.distributed import is_writer

    if args.method == "contrasting":
        from neuronguard.detector.contrasting import ContrastStats, contrast, ranked_neurons

        if not (args.aligned and args.unaligned):
            raise UsageError("contrasting needs --aligned and --unaligned (or use --method importance --model M)")
        aligned, unaligned = _pair(args)
        stats = contrast(aligned, unaligned, _prompts(args), generator=args.generator, positions=args.positions,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature, seed=args.seed)
        if not is_writer():  # every rank holds the summed statistics; rank 0 writes them
            return 0
        for extra in args.merge_stats or []:
            stats = stats + ContrastStats.load(extra)
        if args.stats_out:
            stats.save(args.stats_out)
        provenance = {"method": "contrasting", "positions": args.positions, "generator": args.generator,
                      "prompts": str(args.prompts), "prompts_sha256": file_sha256(args.prompts), "seed": str(args.seed)}
        neurons = ranked_neurons(stats, unaligned, provenance)
        neurons.save(args.out)
        print(f"ranked {len(neurons)} neurons over {stats.count} tokens -> {args.out} (top score {float(neurons.score[0]):.4f})")
        return 0
    from neuronguard.detector.importance import ffn_neuron_set, importance_stats, select_weight_rows

    if not args.model:
        raise UsageError("--method importance needs --model")
    model = load_from_args(args.model, args)
    stats = importance_stats(model, _prompts(args), attention=args.modules == "all", per_query_top=args.per_query_top,
                             epsilon=args.epsilon, batch_size=args.batch_size)
    if not is_writer():
        return 0
    provenance = {"method": "importance", "per_query_top": str(args.per_query_top), "epsilon": str(args.epsilon),
                  "min_fraction": str(args.min_fraction), "prompts": str(args.prompts), "prompts_sha256": file_sha256(args.prompts)}
    if args.modules == "ffn":
        neurons = ffn_neuron_set(stats, model, provenance)
        neurons.save(args.out)
        print(f"ranked {len(neurons)} MLP neurons over {stats.queries} queries -> {args.out}")
        return 0
    rows = select_weight_rows(stats, model, args.min_fraction, provenance)
    rows.save(args.out)
    print(f"{len(rows)} weight-row safety neurons {rows.counts()} over {stats.queries} queries -> {args.out}")
    return 0


def cmd_patch_eval(args: argparse.Namespace) -> int:
    from neuronguard.detector.patching import patch_sweep, sanity_checks
    from neuronguard.models.generation import SamplingParams

    _one_process("patch-eval")
    aligned, unaligned = _pair(args)
    neurons = _mlp_neurons(args.neurons, unaligned)
    prompts = _prompts(args)
    report: dict[str, object] = {"sanity": sanity_checks(aligned, unaligned, prompts[:16])}
    for mode in args.modes:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0 if mode == "sampled" else 0.0, top_p=0.95, seed=args.seed)
        report[mode] = patch_sweep(aligned, unaligned, neurons, prompts, fractions=args.fractions, random_seeds=args.seeds,
                                   params=params, batch_size=args.batch_size)
    write_json(args.out, report)
    for mode in args.modes:
        for row in report[mode]["sweep"]:  # type: ignore[index]
            print(f"{mode} k={row['k']}: restoration top {_fmt(row['top']['restoration_log_odds'])} "
                  f"random {_fmt(row['random_mean']['restoration_log_odds'])}")
    print(f"sanity {report['sanity']} -> {args.out}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_deactivate_eval(args: argparse.Namespace) -> int:
    from neuronguard.detector.deactivation import deactivation_eval
    from neuronguard.models.perplexity import read_texts
    from neuronguard.models.generation import SamplingParams

    _one_process("deactivate-eval")
    aligned = load_from_args(args.aligned, args)
    neurons = _mlp_neurons(args.neurons, aligned)
    k = _k(neurons, args.k, args.fraction, aligned.sites.num_neurons)
    texts = read_texts(args.texts, limit=args.max_texts) if args.texts else None
    report = deactivation_eval(aligned, neurons, k, _prompts(args), texts, random_seeds=args.seeds,
                               params=SamplingParams(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size)
    write_json(args.out, report)
    print(json.dumps(report, indent=1))
    return 0


def cmd_probe_train(args: argparse.Namespace) -> int:
    from neuronguard.models.distributed import process_group

    with process_group(args.device) as device:
        args.device = device
        return _probe_train(args)


def _probe_train(args: argparse.Namespace) -> int:
    """Every rank extracts its share of the features and gets them all back, so every rank fits the
    same probes; rank 0 writes them."""
    from neuronguard.detector.guard_probes import Labeled, prefill_probe, stream_probe
    from neuronguard.models.distributed import is_writer
    from neuronguard.models.prompts import read_labeled, read_prompts

    model = load_from_args(args.model, args)
    neurons = _mlp_neurons(args.neurons, model)
    chosen = neurons.top(_k(neurons, args.k, args.fraction, model.sites.num_neurons))

    def labeled(split: Path | None, harmful: Path | None, harmless: Path | None) -> Labeled:
        if split is not None:
            prompts, labels, _ = read_labeled(split)
            return Labeled(prompts, labels)
        if harmful is None or harmless is None:
            raise UsageError("give a labelled split (--train/--test) or both --harmful and --harmless files")
        bad, good = read_prompts(harmful)[0], read_prompts(harmless)[0]
        return Labeled(bad + good, [1] * len(bad) + [0] * len(good))

    train = labeled(args.train, args.harmful, args.harmless)
    test = labeled(args.test, args.test_harmful, args.test_harmless) if (args.test or args.test_harmful) else None
    sha = file_sha256(args.neurons)
    probe, metrics = prefill_probe(model, chosen, train, test or train, sha256=sha, fpr=args.fpr, seed=args.seed)
    if is_writer():
        probe.save(args.out)
        label = "test" if test else "training (no --test given)"
        print(f"probe k={probe.k} threshold={probe.threshold:.4f}: {label} AUROC {metrics['auroc']:.3f} "
              f"TPR {metrics['tpr']:.3f} at FPR {metrics['fpr']:.3f} -> {args.out}")
    if args.stream_out:
        stream, stream_metrics = stream_probe(model, chosen, train, test or train, sha256=sha, fpr=args.fpr,
                                              max_new_tokens=args.max_new_tokens, seed=args.seed)
        if is_writer():
            stream.save(args.stream_out)
            print(f"stream probe: AUROC {stream_metrics['auroc']:.3f} TPR {stream_metrics['tpr']:.3f} -> {args.stream_out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from neuronguard.detector.compare import compare_sets
    from neuronguard.models.artifact.neurons import NeuronSet

    a, b = NeuronSet.load(args.a), NeuronSet.load(args.b)
    total = int(a.metadata["num_hidden_layers"]) * int(a.metadata["intermediate_size"])
    k = args.k if args.k is not None else max(1, round((args.fraction or 0.05) * total))
    print(json.dumps(compare_sets(a, b, k)))
    return 0


def cmd_bundle_build(args: argparse.Namespace) -> int:
    from neuronguard.detector.build import BuildConfig, build_bundle
    from neuronguard.models.artifact.bundle import load_bundle

    _one_process("bundle build")
    aligned, unaligned = _pair(args)
    heldout = None if str(args.heldout) == "none" else args.heldout
    if not 0 < args.target_fpr < 1:
        raise UsageError("--target-fpr must lie strictly between 0 and 1")
    config = BuildConfig(dev=args.dev, test=args.test, heldout=heldout, texts=args.texts, patch_fraction=args.patch_fraction,
                         request_fpr=args.target_fpr, eval_per_cell=args.eval_per_cell,
                         probe_fraction=args.probe_fraction, stream_probe_fraction=args.stream_probe_fraction, fractions=args.fractions, seeds=args.seeds, target_fpr=args.fpr,
                         eval_prompts=args.eval_prompts, batch_size=args.batch_size, seed=args.seed,
                         contrast_new_tokens=args.max_new_tokens, contrast_positions=args.positions,
                         eval_new_tokens=args.eval_new_tokens)
    report = build_bundle(aligned, unaligned, args.out, config, overwrite=args.overwrite)
    load_bundle(args.out, unaligned)  # the server's own loader accepts it
    print(json.dumps(report["targets"], indent=1))
    print(f"bundle -> {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("identify", help="find safety neurons (contrasting or importance)")
    p.add_argument("--method", choices=("contrasting", "importance"), default="contrasting")
    p.add_argument("--aligned", help="aligned model (contrasting): " + MODEL_HELP)
    p.add_argument("--unaligned", help="unaligned model (contrasting): " + MODEL_HELP)
    p.add_argument("--model", help="model to analyse (importance): " + MODEL_HELP)
    _prompt_args(p)
    p.add_argument("--out", required=True, type=Path, help="neurons.safetensors to write")
    p.add_argument("--generator", choices=("unaligned", "aligned"), default="unaligned", help="which model writes the completions")
    p.add_argument("--positions", choices=POSITIONS, default="completion",
                   help="contrasted positions: generated tokens, prompt tokens, both, or the last prompt token")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy completions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-out", type=Path, help="also save the streamed statistics (mergeable)")
    p.add_argument("--merge-stats", type=Path, nargs="*", help="add statistics saved by other runs before ranking")
    p.add_argument("--modules", choices=("all", "ffn"), default="all", help="importance: weight rows of attention+FFN, or MLP neurons only")
    p.add_argument("--per-query-top", type=float, default=0.05, help="importance: share of a module's neurons activated per query")
    p.add_argument("--epsilon", type=float, help="importance: absolute activation threshold instead of --per-query-top")
    p.add_argument("--min-fraction", type=float, default=1.0, help="importance: share of queries a safety neuron must be active on")
    add_model_arguments(p, batch_size=BATCH_SIZE)
    p.set_defaults(func=cmd_identify)

    p = subparsers.add_parser("patch-eval", help="dynamic activation patching sweep (top-k vs random-k)")
    _pair_args(p)
    p.add_argument("--neurons", required=True, type=Path)
    _prompt_args(p)
    p.add_argument("--out", required=True, type=Path, help="report JSON")
    _sweep_args(p)
    p.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m in ("greedy", "sampled")] or ["greedy"], default=["greedy", "sampled"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    add_model_arguments(p, batch_size=BATCH_SIZE)
    p.set_defaults(func=cmd_patch_eval)

    p = subparsers.add_parser("deactivate-eval", help="zero safety vs random neurons of the aligned model")
    p.add_argument("--aligned", required=True, help=MODEL_HELP)
    p.add_argument("--neurons", required=True, type=Path)
    _prompt_args(p)
    p.add_argument("--texts", type=Path, help="held-out harmless text (.jsonl 'text' or .txt) for perplexity")
    p.add_argument("--max-texts", type=int, default=200)
    p.add_argument("--k", type=int)
    p.add_argument("--fraction", type=float)
    _sweep_args(p, fractions=False)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", required=True, type=Path)
    add_model_arguments(p, batch_size=BATCH_SIZE)
    p.set_defaults(func=cmd_deactivate_eval)

    probe = subparsers.add_parser("probe", help="guard probes").add_subparsers(dest="probe_command", metavar="ACTION", required=True)
    p = probe.add_parser("train", help="train the prefill (and optionally stream) guard probe")
    p.add_argument("--model", required=True, help="the served (unaligned) model: " + MODEL_HELP)
    p.add_argument("--neurons", required=True, type=Path)
    p.add_argument("--train", type=Path, help="labelled split .jsonl (labels harmful/harmless)")
    p.add_argument("--test", type=Path, help="held-out labelled split .jsonl for the reported metrics")
    p.add_argument("--harmful", type=Path)
    p.add_argument("--harmless", type=Path)
    p.add_argument("--test-harmful", type=Path)
    p.add_argument("--test-harmless", type=Path)
    p.add_argument("--k", type=int)
    p.add_argument("--fraction", type=float, help="top fraction of all neurons (default 0.05)")
    p.add_argument("--fpr", type=float, default=0.05, help="target false-positive rate on harmless training prompts")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stream-out", type=Path, help="also train the stream probe on generated tokens")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    add_model_arguments(p, batch_size=BATCH_SIZE)
    p.set_defaults(func=cmd_probe_train)

    p = subparsers.add_parser("compare", help="Jaccard of top-k and Spearman of scores of two neuron sets")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--k", type=int)
    p.add_argument("--fraction", type=float)
    p.set_defaults(func=cmd_compare)

    bundle = subparsers.add_parser("bundle", help="guard bundles").add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    p = bundle.add_parser("build", help="identify, verify, train probes and write a guard bundle")
    _pair_args(p)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dev", type=Path, default=DEV_SPLIT, help="labelled split that fits neurons and probes (default: the organism's dev split)")
    p.add_argument("--test", type=Path, default=TEST_SPLIT, help="labelled split the report is measured on (default: the organism's test split)")
    p.add_argument("--heldout", type=Path, default=HELDOUT_SPLIT,
                   help="labelled split of sources kept out of dev, reported beside test (default: the organism's; 'none' to skip)")
    p.add_argument("--target-fpr", type=float, default=0.02,
                   help="share of benign dev requests (prefill + stream together) the shipped thresholds block (default: 0.02)")
    p.add_argument("--eval-per-cell", type=int, default=40,
                   help="requests per (source, style) in the test and held-out guard evaluation (default: 40)")
    p.add_argument("--texts", type=Path, default=None, help="held-out general text for perplexity")
    p.add_argument("--patch-fraction", type=float, default=0.05)
    p.add_argument("--probe-fraction", type=float,
                   help="prefill probe size as a share of all neurons (default: the smallest k of the probe sweep "
                        "within 0.002 of the best out-of-fold AUROC on dev)")
    p.add_argument("--stream-probe-fraction", type=float, default=0.05)
    _sweep_args(p)
    p.add_argument("--fpr", type=float, default=0.05)
    p.add_argument("--eval-prompts", type=int, help="cap on harmful test prompts for generation-based evaluations")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length for contrasting")
    p.add_argument("--positions", choices=POSITIONS, default="completion",
                   help="positions contrasted to rank neurons (see `identify --positions`)")
    p.add_argument("--eval-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    add_model_arguments(p, batch_size=BATCH_SIZE)
    p.set_defaults(func=cmd_bundle_build)
