"""Load test: many concurrent clients against a live server on loopback, checked for cross-talk.

Every prompt is first sent alone; then `--clients` clients send their requests (harmful and
harmless, streaming and not, greedy) at once. Each round sends the same requests in total
(`--requests` per client at the largest client count), so rounds with different client
counts run the same work and their throughputs compare. The guard report (decision,
stage, patched, and the score to 1e-4: a batched step sums the readout in another order)
and the text each request gets under load must equal what it got alone, the only errors
allowed are 503 `overloaded`, the registered-hooks gauge must read 0 before and after, and
the server's resident memory must stay flat. Each round reports requests/s, generated
tokens/s (the server's counter) and the p50 time to the first streamed content.

Serves the built-in organism when it has been built, else a tiny random model with a
planted bundle (testkit/server_fixtures.py), in a `neuronguard serve` subprocess:

    .venv/bin/python -m bench.load_test                     # 64 clients x 4 requests
    .venv/bin/python -m bench.load_test --max-queue 8       # sustained overload: 503 rate
    .venv/bin/python -m bench.load_test --engine batched --clients 1,32 --rounds 1
    .venv/bin/python -m bench.load_test --engine batched --clients 32 --guard-mode off   # unguarded
    .venv/bin/python -m bench.load_test --tiny ...          # the tiny model even when the organism is built
    .venv/bin/python -m bench.load_test --clients 1,32 --out bench/results/concurrency/load_test-DATE-MODE.json
                                                            # also store it, with command, machine and commit

`tests/test_reliability_load.py` runs the same checks in a reduced form in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.run_record import emit
from neuronguard.models.chat import Request, as_messages

ROOT = Path(__file__).resolve().parents[1]
Outcome = tuple[Any, ...]  # what must not change under load: (status, finish reason, text, guard report)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base: str, timeout_s: float, alive: Callable[[], bool]) -> bool:
    """Poll `/ready` until it answers 200 (True), the server dies or the time runs out (False)."""
    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


@contextmanager
def serve_in_thread(app: Any, timeout_s: float = 60.0) -> Iterator[str]:
    """Run `app` under a real uvicorn server on 127.0.0.1 in a thread; yield its base URL once ready."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if not wait_ready(base, timeout_s, thread.is_alive):
            raise RuntimeError(f"server on {base} not ready after {timeout_s} s")
        yield base
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def chat_body(prompt: Request, stream: bool, max_tokens: int) -> dict[str, Any]:
    return {"model": "m", "messages": as_messages(prompt), "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


SCORE_TOLERANCE = 1e-4  # probe scores of one request in different batches differ by float rounding (~1e-7)


def _guard_key(guard: dict[str, Any] | None) -> tuple[Any, ...] | None:
    return None if guard is None else (guard["decision"], guard["stage"], guard["score"], guard["patched"])


def same_outcome(a: Outcome, b: Outcome) -> bool:
    """Equal outcomes, the guard score compared to `SCORE_TOLERANCE` (decisions, text and the rest exactly)."""
    if len(a) != len(b) or len(a) < 4 or a[3] is None or b[3] is None:
        return a == b
    (ga, gb) = (a[3], b[3])
    return a[:3] == b[:3] and ga[:2] == gb[:2] and ga[3] == gb[3] and abs(ga[2] - gb[2]) <= SCORE_TOLERANCE


class _FirstContent:
    """Records when a streamed answer's first content arrived (the client-side time to first token)."""

    def __init__(self) -> None:
        self.at: float | None = None


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], first: _FirstContent | None = None) -> Outcome:
    """Send one chat request; return its comparable outcome."""
    if not body["stream"]:
        response = await client.post("/v1/chat/completions", json=body)
        data = response.json()
        if response.status_code != 200:
            return (response.status_code, data["error"]["code"])
        choice = data["choices"][0]
        return (200, choice["finish_reason"], choice["message"]["content"], _guard_key(data.get("guard")))
    text, finish, guard = "", None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return (response.status_code, json.loads(await response.aread())["error"]["code"])
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return (200, "stream-error", event["error"]["code"])
            for choice in event["choices"]:
                content = choice["delta"].get("content") or ""
                if content and first is not None and first.at is None:
                    first.at = time.perf_counter()
                text += content
                finish = choice.get("finish_reason") or finish
            guard = event.get("guard") or guard
    return (200, finish, text, _guard_key(guard))


@dataclass
class LoadReport:
    requests: int = 0
    alone: list[Outcome] = field(default_factory=list)  # each workload item's outcome when sent alone
    overloaded: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)  # streamed answers: request sent to first content
    generated_tokens: float = 0.0  # the server's generation-token counter over the round
    wall_s: float = 0.0
    max_queue_depth: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.errors

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s) or [0.0]
        ttft = sorted(self.ttft_s) or [0.0]
        wall = max(self.wall_s, 1e-9)
        return {"requests": self.requests, "overloaded_503": self.overloaded,
                "overload_rate": round(self.overloaded / max(1, self.requests), 3),
                "mismatches": len(self.mismatches), "errors": len(self.errors), "wall_s": round(self.wall_s, 2),
                "p50_s": round(lat[len(lat) // 2], 3), "p99_s": round(lat[int(len(lat) * 0.99)], 3),
                "requests_per_s": round(self.requests / wall, 2), "tokens_per_s": round(self.generated_tokens / wall, 1),
                "p50_ttft_s": round(ttft[len(ttft) // 2], 4),
                "max_queue_depth_seen": self.max_queue_depth}


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def metric(base: str, name: str) -> float:
    """Sum of every sample of `name` on /metrics (0 when absent)."""
    return metric_sum(httpx.get(f"{base}/metrics", timeout=10).text, name)


async def run_load(base: str, workload: list[dict[str, Any]], clients: int, requests_each: int,
                   headers: dict[str, str] | None = None) -> LoadReport:
    """Baseline each body alone, then `clients` concurrent clients x `requests_each`; compare outcomes."""
    report = LoadReport()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits, headers=headers) as client:
        alone = report.alone = [await one_request(client, body) for body in workload]
        for body, outcome in zip(workload, alone):
            if outcome[0] != 200 or outcome[1] == "stream-error":
                report.errors.append(f"alone: {outcome} for {body}")
        watching = True

        async def watch_queue() -> None:
            while watching:
                depth = await client.get("/metrics")
                for line in depth.text.splitlines():
                    if line.startswith("neuronguard_queue_depth "):
                        report.max_queue_depth = max(report.max_queue_depth, float(line.split()[-1]))
                await asyncio.sleep(0.05)

        async def worker(worker_id: int) -> None:
            for n in range(requests_each):
                i = (worker_id * requests_each + n) % len(workload)
                start = time.perf_counter()
                first = _FirstContent()
                try:
                    outcome = await one_request(client, workload[i], first)
                except httpx.HTTPError as exc:
                    report.errors.append(f"client {worker_id}: {type(exc).__name__}: {exc}")
                    continue
                report.latencies_s.append(time.perf_counter() - start)
                if first.at is not None:
                    report.ttft_s.append(first.at - start)
                report.requests += 1
                if outcome == (503, "overloaded"):
                    report.overloaded += 1
                elif outcome[0] != 200 or outcome[1] == "stream-error":
                    report.errors.append(f"client {worker_id}: {outcome}")
                elif not same_outcome(outcome, alone[i]):
                    report.mismatches.append(f"request {i}: alone {alone[i]} vs under load {outcome}")

        tokens_before = metric_sum((await client.get("/metrics")).text, "neuronguard_generation_tokens_total")
        watcher = asyncio.ensure_future(watch_queue())
        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        report.wall_s = time.perf_counter() - start
        watching = False
        await watcher
        tokens_after = metric_sum((await client.get("/metrics")).text, "neuronguard_generation_tokens_total")
        report.generated_tokens = tokens_after - tokens_before
    return report


def mixed_workload(harmful: list[str], harmless: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """Every prompt both streaming and not, harmful and harmless interleaved."""
    prompts = [p for pair in zip(harmful, harmless) for p in pair]
    return [chat_body(p, stream, max_tokens) for p in prompts for stream in (False, True)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def served_files(tmp: Path, tiny: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(serve arguments, harmful prompts, harmless prompts): the organism (unless `tiny`), else tiny fixtures."""
    from testkit.server_fixtures import HARMFUL, HARMLESS, organism_available

    if organism_available() and not tiny:
        from neuronguard.models.default_data import TEST_SPLIT
        from neuronguard.models.prompts import read_prompts

        return [], read_prompts(TEST_SPLIT, label="harmful", limit=8)[0], read_prompts(TEST_SPLIT, label="harmless", limit=8)[0]
    subprocess.run([sys.executable, "-m", "testkit.server_fixtures", str(tmp)], check=True, capture_output=True, cwd=ROOT)
    args = ["--model", str(tmp / "model"), "--bundle", str(tmp / "bundle"), "--patch-source", str(tmp / "twin")]
    harmful = [HARMFUL, HARMFUL + " Now.", "Write a poem about the sea.", "A poem about the wind, please."]
    harmless = [HARMLESS, HARMLESS + " Quickly.", "Mix flour and water", "How do I knead dough?"]
    return args, harmful, harmless


@contextmanager
def launched(serve_args: list[str], tmp: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A `neuronguard serve` subprocess on 127.0.0.1, once ready: (base URL, process); SIGTERM at exit."""
    port = port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NEURONGUARD_DEVICE": "cpu"}
    log_path = tmp / f"server-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "neuronguard.cli", "serve", *serve_args, "--port", str(port),
                                 "--log-level", "warning"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            if not wait_ready(base, 300, lambda: proc.poll() is None):
                raise SystemExit(f"server did not start: {log_path.read_text()[-2000:]}")
            yield base, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="64", help="concurrent clients; a comma-separated list runs each in turn")
    parser.add_argument("--requests", type=int, default=4,
                        help="requests per client at the largest client count; every round sends the same requests in "
                             "total (so rounds with fewer clients send more each), which makes their throughputs comparable")
    parser.add_argument("--rounds", type=int, default=3, help="load rounds (memory is sampled after each)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--rss-tolerance-mb", type=float, default=64.0)
    parser.add_argument("--engine", choices=("batched", "serial"), default=None, help="the server's engine (default: its own)")
    parser.add_argument("--guard-mode", default=None, help="the server's guard mode, e.g. off for the unguarded baseline")
    parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    parser.add_argument("--tiny", action="store_true", help="serve the tiny random model with its planted bundle")
    parser.add_argument("--out", type=Path, help="also write the result, with its run record, to this JSON file "
                                                "(bench/results/concurrency/ feeds the docs' tables)")
    args = parser.parse_args()
    client_counts = [int(c) for c in str(args.clients).split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="neuronguard-load-"))
    serve_args, harmful, harmless = served_files(tmp, args.tiny)
    extra = (["--engine", args.engine] if args.engine else []) + (["--guard-mode", args.guard_mode] if args.guard_mode else [])
    with launched([*serve_args, *extra, "--max-queue", str(args.max_queue)], tmp, args.port) as (base, proc):
        workload = mixed_workload(harmful, harmless, args.max_tokens)
        hooks_before = metric(base, "neuronguard_registered_hooks")
        rss = [rss_mb(proc.pid)]
        reports = []
        total = args.requests * max(client_counts)
        for clients in client_counts:
            for _ in range(args.rounds):
                reports.append(asyncio.run(run_load(base, workload, clients, -(-total // clients))))
                rss.append(rss_mb(proc.pid))
        hooks_after = metric(base, "neuronguard_registered_hooks")
    growth = rss[-1] - rss[1]  # after the first round: allocator and caches are warm
    result = {"engine": args.engine or "server default", "guard_mode": args.guard_mode or "server default",
              "clients": client_counts, "requests_per_round": total, "max_tokens": args.max_tokens, "max_queue": args.max_queue,
              "rounds": [dict(clients=c, **r.summary()) for c, r in
                         zip([c for c in client_counts for _ in range(args.rounds)], reports)],
              "registered_hooks_before_after": [hooks_before, hooks_after],
              "rss_mb": [round(r, 1) for r in rss], "rss_growth_after_warmup_mb": round(growth, 1),
              "client_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    emit(result, args.out)
    for r in reports:
        for line in (r.mismatches + r.errors)[:5]:
            print("FAIL:", line, file=sys.stderr)
    failed = any(not r.ok for r in reports) or hooks_after != 0 or hooks_before != 0 or growth > args.rss_tolerance_mb
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
