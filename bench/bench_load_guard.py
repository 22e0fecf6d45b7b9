"""Guarded against unguarded serving under concurrent load, paired within one run.

    python -m bench.bench_load_guard --clients 32 --requests 8 --rounds 6 --max-tokens 64
    python -m bench.bench_load_guard --mode patch      # live patching against no guard

Two `neuronguard serve` processes on the built-in organism (its default engine unless
`--engine`): one with `--guard-mode flag` (both probes score every step and nothing is
stopped, so it generates the same tokens as the other), one with `--guard-mode off`. With
`--mode patch` the first one also patches, and so answers differently: its ratio is then one
of tokens per second. Rounds run in ABBA order, one server at a time (the idle one uses no
CPU), each round the same `bench.load_test` workload with every answer checked against the
same prompt sent alone.
Prints each mode's tokens/s and p50 time to first token per round, and the median over
round pairs of guarded over unguarded time per generated token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.load_test import served_files, launched, mixed_workload, run_load
from bench.run_record import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="requests per client in each round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mode (pairs of rounds, in ABBA order)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engine", choices=("batched", "serial"), default=None)
    parser.add_argument("--mode", choices=("flag", "patch"), default="flag", help="the guarded server's guard mode")
    parser.add_argument("--out", type=Path, help="also write the result, with its run record, to this JSON file")
    args = parser.parse_args()
    modes = (args.mode, "off")
    tmp = Path(tempfile.mkdtemp(prefix="neuronguard-load-guard-"))
    serve_args, harmful, harmless = served_files(tmp)
    engine = ["--engine", args.engine] if args.engine else []
    workload = mixed_workload(harmful, harmless, args.max_tokens)
    rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
    failures: list[str] = []
    with ExitStack() as stack:
        bases = {mode: stack.enter_context(launched([*serve_args, *engine, "--guard-mode", mode], tmp))[0]
                 for mode in modes}
        for mode in modes:  # warm-up round each, not counted
            asyncio.run(run_load(bases[mode], workload, args.clients, 1))
        for i in range(args.rounds):
            for mode in (modes if i % 2 == 0 else modes[::-1]):
                report = asyncio.run(run_load(bases[mode], workload, args.clients, args.requests))
                failures += report.mismatches + report.errors
                rounds[mode].append(report.summary())
    ratios = [off["tokens_per_s"] / guarded["tokens_per_s"] for guarded, off in zip(rounds[args.mode], rounds["off"])]
    emit({
        "clients": args.clients, "requests_per_round": args.clients * args.requests, "max_tokens": args.max_tokens,
        "engine": args.engine or "server default", "guarded_mode": args.mode,
        "tokens_per_s": {m: [r["tokens_per_s"] for r in rounds[m]] for m in modes},
        "p50_ttft_s": {m: [r["p50_ttft_s"] for r in rounds[m]] for m in modes},
        "guarded_over_unguarded_time_per_token": {"median": round(statistics.median(ratios), 3),
                                        "per_round_pair": [round(r, 3) for r in ratios]},
        "mismatches_and_errors": len(failures),
    }, args.out)
    for line in failures[:5]:
        print("FAIL:", line)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
