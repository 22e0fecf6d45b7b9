"""Tensor-parallel serving decides exactly as one process: the same tokens, readouts and blocks.

The organism runs as a torchrun group of two CPU ranks (gloo) and as one process, on the same
32 mixed requests (plain, guarded, guarded and patched, patched; greedy and seeded sampling;
blocks before the first token and mid-stream), through `bench.tensor_parallel`; then as a
live `serve --tensor-parallel-size 2`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.load_test import free_port, wait_ready
from neuronguard.cli import main as cli_main
from testkit.server_fixtures import HARMFUL, HARMLESS, organism_available
from testkit.server_support import chat

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
    return {"one": _run(tmp / "one"), "two": _run(tmp / "two", ranks=2), "plain": _run(tmp / "plain", "--mode", "plain")}


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


def test_serve_with_two_ranks_answers_guards_refuses_the_serial_paths_and_drains(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NEURONGUARD_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(29605 + os.getpid() % 4)}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "neuronguard.cli", "serve", "--engine", "batched",
                                 "--tensor-parallel-size", "2", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert wait_ready(base, 180, lambda: proc.poll() is None), log_path.read_text()[-3000:]
            answer = httpx.post(f"{base}/v1/chat/completions", json=chat(HARMLESS, max_tokens=8, temperature=0), timeout=60)
            assert answer.status_code == 200 and answer.json()["guard"]["decision"] == "allow", answer.text
            for body, path, param in ((chat(HARMLESS, logprobs=True), "/v1/chat/completions", "logprobs"),
                                      ({"input": HARMFUL}, "/v1/moderations", None)):
                refused = httpx.post(f"{base}{path}", json=body, timeout=60)
                error = refused.json()["error"]
                assert refused.status_code == 400 and error["code"] == "unsupported_parameter", refused.text
                assert error["param"] == param and "tensor-parallel" in error["message"]
            os.killpg(proc.pid, signal.SIGTERM)  # as Kubernetes stops a pod: every process of the group gets it
            code = proc.wait(90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert code == 0, log_path.read_text()[-3000:]
    leftover = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    assert leftover.stdout == "", "a rank outlived the server"


def test_tensor_parallel_needs_the_batched_engine_and_says_so_before_binding(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["serve", "--engine", "serial", "--tensor-parallel-size", "2", "--port", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "(fix: add --engine batched)" in lines[0], lines
