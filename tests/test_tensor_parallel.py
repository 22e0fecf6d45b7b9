"""Tensor-parallel serving decides exactly as one process: the same tokens, readouts and blocks.

The organism runs as a torchrun group of two CPU ranks (gloo) and as one process, on the same
32 mixed requests (plain, guarded, guarded and patched, patched; greedy and seeded sampling;
blocks before the first token and mid-stream), through `bench.tensor_parallel`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.server_fixtures import organism_available

ROOT = Path(__file__).resolve().parents[1]
STREAM_THRESHOLD = "0.5"  # low enough that some guarded requests are blocked mid-stream
pytestmark = pytest.mark.skipif(not organism_available(), reason="the built-in organism is not in this checkout")


def _run(out: Path, *extra: str, ranks: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workload = ["-m", "bench.tensor_parallel", "--out", str(out), "--stream-threshold", STREAM_THRESHOLD, *extra]
    launcher: list[str] = []
    if ranks > 1:
        launcher = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
                    "--master-addr", "127.0.0.1", "--master-port", str(29600 + os.getpid() % 10)]
        workload.append("--tensor-parallel")
    command = [sys.executable, *launcher, *workload]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("tp")
    return {"one": _run(tmp / "one"), "two": _run(tmp / "two", ranks=2), "plain": _run(tmp / "plain", "--no-guard")}


def test_two_ranks_make_the_same_tokens_and_decisions(runs: dict[str, dict]) -> None:
    one, two = runs["one"]["requests"], runs["two"]["requests"]
    assert runs["two"]["tensor_parallel_size"] == 2
    assert len(one) == len(two) == 32
    for i, (a, b) in enumerate(zip(one, two)):
        assert a["tokens"] == b["tokens"], f"request {i} ({a['variant']}): tokens differ"
        assert a["blocked_at"] == b["blocked_at"], f"request {i} ({a['variant']}): decisions differ"
        assert a["finish"] == b["finish"]
        assert len(a["readouts"]) == len(b["readouts"])
        for x, y in zip(a["readouts"], b["readouts"]):
            assert max(abs(p - q) for p, q in zip(x, y)) < 1e-4


def test_the_workload_exercises_every_guard_path(runs: dict[str, dict]) -> None:
    """Blocks at prefill and mid-stream, and patches that change tokens: else the comparison shows little."""
    one, plain = runs["one"]["requests"], runs["plain"]["requests"]
    blocks = [r["blocked_at"] for r in one if r["blocked_at"] is not None]
    assert 0 in blocks and any(b > 0 for b in blocks)
    assert all(r["blocked_at"] is None and not r["readouts"] for r in one if r["variant"] in ("plain", "patched"))
    changed = [i for i, (r, p) in enumerate(zip(one, plain)) if r["variant"] == "patched" and r["tokens"] != p["tokens"]]
    assert changed, "live patching changed no request's tokens"
