"""Concurrent-client tables rendered from stored `bench.load_test` and `bench.bench_load_guard` results.

Each result in `bench/results/concurrency/` carries its command, machine and commit
(`bench.run_record`); a row is one run, so runs on different machines stay apart, and the
verdict lines say per machine what the runs give against the serving targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench/results/concurrency"
THROUGHPUT_TARGET = 6.0  # 32 clients over one client
TTFT_TARGET = 3.0  # p50 time to first token, 32 clients over one client
GUARD_TARGET = 1.05  # guarded over unguarded time per token
PATCH_TARGET = 2.0  # patched over unguarded


def _results(prefix: str) -> list[dict[str, Any]]:
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}-*.json"))]
    return sorted(runs, key=lambda r: (r["run"]["machine"]["cpu"], r["run"]["utc"]))


def _machine(run: dict[str, Any]) -> str:
    m = run["run"]["machine"]
    return f"{m['cpu']}, {m['logical_cpus']} cores"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _count(met: int, runs: int) -> str:
    """How many runs met a target: 'met in every run', or the count in bold when some missed."""
    return f"met in all {runs} runs" if met == runs else f"**met in {met} of {runs} runs**"


def _range(values: list[float], digits: int = 2) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}–{hi:.{digits}f}"


def _ends(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one-client round and the round with the most clients."""
    rounds = result["rounds"]
    return min(rounds, key=lambda r: r["clients"]), max(rounds, key=lambda r: r["clients"])


def _concurrency() -> tuple[list[str], list[str]]:
    """Table rows (one per `bench.load_test` run) and one verdict line per machine."""
    rows = ["| machine | run (UTC, commit) | guard mode | max tokens | 1 client tokens/s | N clients tokens/s | ratio "
            "| p50 time to first token, 1 → N (ratio) | mismatches, errors |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts: dict[str, dict[str, list[float]]] = {}
    for r in _results("load_test"):
        one, many = _ends(r)
        ratio, ttft = many["tokens_per_s"] / one["tokens_per_s"], many["p50_ttft_s"] / one["p50_ttft_s"]
        tokens = r["max_tokens"]
        rows.append(f"| {_machine(r)} | {r['run']['utc']}, {r['run']['commit']} | {r['guard_mode']} | {tokens} "
                    f"| {one['tokens_per_s']:.0f} | {many['tokens_per_s']:.0f} ({many['clients']}) | **{ratio:.2f}** "
                    f"| {1000 * one['p50_ttft_s']:.0f} → {1000 * many['p50_ttft_s']:.0f} ms ({ttft:.1f}×) "
                    f"| {sum(x['mismatches'] for x in r['rounds'])}, {sum(x['errors'] for x in r['rounds'])} |")
        v = verdicts.setdefault(_machine(r), {"ratio": [], "ttft": [], "mismatches": []})
        v["ratio"].append(ratio)
        v["ttft"].append(ttft)
        v["mismatches"].append(sum(x["mismatches"] + x["errors"] for x in r["rounds"]))
    lines = []
    for machine, v in verdicts.items():
        n = len(v["ratio"])
        lines.append(f"- {machine}: throughput {_range(v['ratio'])}× one client (≥ {THROUGHPUT_TARGET:g}×: "
                    f"{_count(sum(x >= THROUGHPUT_TARGET for x in v['ratio']), n)}); p50 time to first token "
                    f"{_range(v['ttft'], 1)}× one client's (≤ {TTFT_TARGET:g}×: {_count(sum(x <= TTFT_TARGET for x in v['ttft']), n)}); "
                    f"{sum(v['mismatches'])} mismatches and errors.")
    return rows, lines


def _block(table_and_verdicts: tuple[list[str], list[str]]) -> str:
    rows, lines = table_and_verdicts
    return "\n".join([*rows, "", *lines]) + "\n"


def concurrency() -> str:
    """One row per `bench.load_test` run: tokens/s and p50 time to first token at one client and at the most."""
    return _block(_concurrency())


def _load_guard() -> tuple[list[str], list[str]]:
    """Table rows (one per `bench.bench_load_guard` run) and one verdict line per run."""
    rows = ["| machine | run (UTC, commit) | guarded mode | clients, max tokens | guarded ÷ unguarded (median of pairs) "
            "| per pair | p50 time to first token, guarded / off | mismatches, errors |", "|---|---|---|---|---|---|---|---|"]
    lines = []
    for r in _results("load_guard"):
        ratio = r["guarded_over_unguarded_time_per_token"]
        ttft = r["p50_ttft_s"]
        mode = r["guarded_mode"]
        rows.append(f"| {_machine(r)} | {r['run']['utc']}, {r['run']['commit']} | {mode} | {r['clients']}, {r['max_tokens']} "
                    f"| **{ratio['median']:.3f}** | {_range(ratio['per_round_pair'])} "
                    f"| {_range([1000 * t for t in ttft[mode]], 0)} / {_range([1000 * t for t in ttft['off']], 0)} ms "
                    f"| {r['mismatches_and_errors']} |")
        target = PATCH_TARGET if mode == "patch" else GUARD_TARGET
        what = "patched" if mode == "patch" else f"guarded (`{mode}`)"
        lines.append(f"- {_machine(r)}: {what} ÷ unguarded time per token at {r['clients']} clients, {r['max_tokens']} tokens, "
                     f"median of {len(ratio['per_round_pair'])} round pairs: {ratio['median']:.3f} (≤ {target:g}×: "
                     f"{_met(ratio['median'] <= target)}).")
    return rows, lines


def load_guard() -> str:
    """One row per `bench.bench_load_guard` run: guarded (or patched) over unguarded, paired rounds."""
    return _block(_load_guard())


def serving_verdicts() -> str:
    """The verdict lines of both tables, for the README."""
    return "\n".join([*_concurrency()[1], *_load_guard()[1]]) + "\n"
