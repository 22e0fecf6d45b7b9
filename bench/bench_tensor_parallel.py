"""The guard's cost per step under tensor parallelism, and whether two ranks decide as one process.

    python -m bench.bench_tensor_parallel                 # 3 rounds, 32 requests x 64 tokens, 1 thread per rank
    python -m bench.bench_tensor_parallel --rounds 5

Each round runs `bench.tensor_parallel` four ways in a rotating order: one process and a
torchrun group of two CPU ranks (gloo), each unguarded (`--mode plain`) and with every
request read out on every step (`--mode readout`: the same steps, nothing blocked). The
guard's cost at TP = 2 holds its readout hooks and the one all-reduce of the [rows, heads]
logits per step; at TP = 1 it holds the hooks alone, so the difference of the two ratios is
the all-reduce's share. Figures are medians of per-round ratios of seconds per step (model
loading excluded); noisy on a busy machine, so the collective is also timed alone (500
all-reduces of the same [requests, 2] logits on the same group) and set against the step. A final mixed run (blocks, patching, sampling) compares the two
ranks' tokens and decisions with one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, ranks: int, *args: str) -> dict:
    workload = ["-m", "bench.tensor_parallel", "--out", str(out), *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    command = [sys.executable, *launcher, *workload, *(["--tensor-parallel"] if ranks > 1 else [])]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads((out / "result.json").read_text())


def mismatches(a: dict, b: dict) -> tuple[int, int, float]:
    tokens = sum(x["tokens"] != y["tokens"] for x, y in zip(a["requests"], b["requests"]))
    decisions = sum(x["blocked_at"] != y["blocked_at"] for x, y in zip(a["requests"], b["requests"]))
    diff = max((abs(p - q) for x, y in zip(a["requests"], b["requests"]) for r, s in zip(x["readouts"], y["readouts"])
                for p, q in zip(r, s)), default=0.0)
    return tokens, decisions, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    sizes = ["--requests", str(args.requests), "--max-new-tokens", str(args.max_new_tokens)]
    cells = [(1, "plain"), (1, "readout"), (2, "plain"), (2, "readout")]
    per_step: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    all_reduce: list[float] = []
    waited: list[float] = []  # per TP = 2 guarded step, seconds spent waiting for the readout's all-reduce
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for ranks, mode in cells[round_ % 4:] + cells[: round_ % 4]:
                result = run(Path(tmp) / f"{ranks}-{mode}-{round_}", ranks, "--mode", mode, *sizes)
                per_step[(ranks, mode)].append(result["wall_s"] / result["steps"])
                if result["all_reduce_s"] is not None:
                    all_reduce.append(result["all_reduce_s"])
                if mode == "readout" and result["all_reduce_wait_s"] is not None:
                    waited.append(result["all_reduce_wait_s"] / result["steps"])
        check = ["--stream-threshold", "0.5", *sizes]
        tokens, decisions, diff = mismatches(run(Path(tmp) / "check-1", 1, *check), run(Path(tmp) / "check-2", 2, *check))

    def ratio(ranks: int) -> float:
        return statistics.median(g / p for g, p in zip(per_step[(ranks, "readout")], per_step[(ranks, "plain")]))

    report = {
        "rounds": args.rounds, "requests": args.requests, "max_new_tokens": args.max_new_tokens, "threads_per_rank": 1,
        "ms_per_step": {f"tp{r}_{m}": round(1000 * statistics.median(v), 3) for (r, m), v in per_step.items()},
        "guarded_over_plain_tp1": round(ratio(1), 4), "guarded_over_plain_tp2": round(ratio(2), 4),
        "tp2_over_tp1_plain": round(statistics.median(t / o for t, o in zip(per_step[(2, "plain")], per_step[(1, "plain")])), 4),
        "mixed_check": {"token_mismatches": tokens, "decision_mismatches": decisions, "max_readout_diff": diff},
    }
    report["all_reduce_share"] = round(report["guarded_over_plain_tp2"] - report["guarded_over_plain_tp1"], 4)
    # The collective alone, against the unguarded TP = 2 step it is added to.
    report["all_reduce_us"] = round(1e6 * statistics.median(all_reduce), 1)
    report["all_reduce_over_tp2_step"] = round(statistics.median(all_reduce) / statistics.median(per_step[(2, "plain")]), 5)
    # What it adds to a guarded step once overlapped with the rest of the forward: the wait at its end.
    report["all_reduce_wait_us_per_step"] = round(1e6 * statistics.median(waited), 1)
    report["all_reduce_wait_over_tp2_step"] = round(statistics.median(waited) / statistics.median(per_step[(2, "plain")]), 5)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
