"""`--engine batched`: many chat requests decode together and each gets what it gets alone on the serial engine.

Every comparison is against the serial engine with one request at a time: the same text,
finish reason and guard report (decision, stage, score, patched) for 8 and 32 concurrent
requests mixing harmful and harmless prompts, streaming and not, prefill and mid-stream
blocks, and live patching on a subset. Disconnects cancel their engine request, guard
failures fail closed, parameters the engine cannot do run on the serial path, SIGTERM
drains the requests in flight.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bench.load_test import free_port, metric, metric_sum, serve_in_thread, wait_ready
from neuronguard.errors import UsageError
from neuronguard.models.hooks import count_hooks
from neuronguard.server.app import create_app
from neuronguard.server.runtime import Runtime
from neuronguard.server.settings import Settings
from testkit.server_fixtures import HARMFUL, HARMLESS, api_client, sse_events
from testkit.server_support import (  # noqa: F401 - fixtures
    anyio_backend, app_for, bundle_path, chat, runtime, same_up_to_rounding, settings)

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [HARMLESS, HARMFUL, HARMLESS + " Quickly.", "Mix flour and water", "Write a poem about the sea.",
           "How do I knead dough?", "A poem about the wind, please.", HARMFUL + " Now."]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


async def settled(engine: Any, timeout_s: float = 5.0) -> int:
    """Requests still in the engine once its thread has finished the last answered ones (bounded wait)."""
    deadline = time.perf_counter() + timeout_s
    while engine.stats().active_requests and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    return engine.stats().active_requests


def workload(n: int) -> list[dict[str, Any]]:
    """n chat bodies: every prompt streaming and not, some patched, some with a stream threshold that blocks."""
    bodies = []
    for i in range(n):
        prompt, extra = PROMPTS[i % len(PROMPTS)], {"stream": i % 2 == 1, "max_tokens": 6 + i % 7}
        if i % 4 == 2:
            extra["guard"] = {"mode": "block+patch"}
        if i % 8 == 3:  # HARMLESS passes the prefill at 0.45 and is stopped mid-stream (test_server_api)
            prompt, extra["guard"], extra["max_tokens"] = HARMLESS, {"threshold": 0.45}, 20
        bodies.append(chat(prompt, **extra))
    return bodies


def comparable(response: httpx.Response) -> Any:
    """What must not depend on the engine or the load: status, text, finish reason, guard report.

    Compare with `same_up_to_rounding`: probe scores may differ by rounding (see there).
    """
    if response.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(response.text)
        text = "".join(c["delta"].get("content") or "" for e in events[:-1] if "choices" in e for c in e["choices"])
        finish = [c.get("finish_reason") for e in events[:-1] if "choices" in e for c in e["choices"] if c.get("finish_reason")]
        return response.status_code, text, finish, [e.get("guard") for e in events[:-1] if e.get("guard")]
    body = response.json()
    for volatile in ("id", "created"):
        body.pop(volatile, None)
    return response.status_code, body


def assert_same(responses: list[httpx.Response], expected: list[Any]) -> None:
    for i, (response, alone_outcome) in enumerate(zip(responses, expected, strict=True)):
        assert same_up_to_rounding(comparable(response), alone_outcome), f"request {i}"


async def alone(runtime: Runtime, settings: Settings, bodies: list[dict[str, Any]]) -> list[Any]:
    async with api_client(app_for(runtime, settings, engine="serial")) as client:
        return [comparable(await client.post("/v1/chat/completions", json=body)) for body in bodies]


@pytest.mark.parametrize("clients", [8, 32])
async def test_concurrent_requests_get_exactly_what_each_gets_alone_on_the_serial_engine(runtime, settings, clients) -> None:
    bodies = workload(clients)
    expected = await alone(runtime, settings, bodies)
    app = app_for(runtime, settings, engine="batched")
    async with api_client(app) as client:
        engine = app.state.neuronguard.batch.engine
        steps_before = engine.stats().steps
        together = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for body in bodies))
        steps = engine.stats().steps - steps_before
        active = await settled(engine)
        metrics = (await client.get("/metrics")).text
    assert_same(together, expected)
    assert active == 0
    reports = [r[1].get("guard") if len(r) == 2 else (r[3] or [None])[-1] for r in expected]
    stages = {(g["stage"], g["decision"]) for g in reports if g}
    assert {("prefill", "block"), ("stream", "block"), ("prefill", "allow")} <= stages  # blocks at both stages
    assert any(g["patched"] for g in reports if g) and not all(g["patched"] for g in reports if g)  # a patched subset
    released = sum(len(r[1]["choices"][0]["message"]["content"]) if len(r) == 2 else len(r[1]) for r in expected)
    assert released > 0 and steps < sum(b["max_tokens"] + 1 for b in bodies)  # they shared steps
    assert "\nneuronguard_batch_size " in metrics and "\nneuronguard_kv_cache_usage " in metrics
    assert "\nneuronguard_registered_hooks 0.0" in metrics and "\nneuronguard_running_requests 0.0" in metrics
    assert count_hooks(runtime.loaded.model) == count_hooks(runtime.patch_source.model) == 0  # the engine removed its own


async def test_parameters_the_engine_cannot_do_run_on_the_serial_path(runtime, settings) -> None:
    bodies = [chat(HARMLESS, logprobs=True, top_logprobs=2), chat(HARMLESS, frequency_penalty=1.5, max_tokens=12),
              chat(HARMLESS, logit_bias={"5": 100}), chat(HARMLESS, presence_penalty=-2.0, stream=True),
              chat("Write a poem", temperature=0.9, seed=7), chat(HARMLESS, n=2, temperature=0.8, seed=3)]
    expected = await alone(runtime, settings, bodies)
    async with api_client(app_for(runtime, settings, engine="batched")) as client:
        together = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for body in bodies))
        moderation = await client.post("/v1/moderations", json={"input": [HARMLESS, HARMFUL]})
    assert_same(together, expected)
    assert moderation.status_code == 200 and [r["flagged"] for r in moderation.json()["results"]] == [False, True]


def test_a_client_that_disconnects_cancels_its_engine_request(runtime, settings) -> None:
    app = app_for(runtime, settings, engine="batched")
    body = chat(HARMLESS, max_tokens=200, stream=True, guard={"mode": "block+patch"})
    with serve_in_thread(app) as base:
        engine = app.state.neuronguard.batch.engine
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
            assert next(response.iter_lines()).startswith("data: ")
        start = time.perf_counter()
        while engine.stats().active_requests or metric(base, "neuronguard_running_requests"):
            assert time.perf_counter() - start < 10, "the engine request was not cancelled"
            time.sleep(0.01)
        freed_s = time.perf_counter() - start
        generated = metric(base, "neuronguard_generation_tokens_total")
        after = httpx.post(f"{base}/v1/chat/completions", json=chat(HARMLESS), timeout=30)
    assert freed_s < 2.0 and generated < 150 and after.status_code == 200


async def test_a_failing_probe_fails_closed_and_the_engine_serves_on(runtime, settings, monkeypatch) -> None:
    calls: list[int] = []
    stream_score = runtime.bundle.stream_probe.score_logit

    def breaks_on_third_token(logit: float) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("probe exploded")
        return stream_score(logit)

    def broken(_logit: float) -> float:
        raise RuntimeError("probe exploded")

    app = app_for(runtime, settings, engine="batched")
    async with api_client(app) as client:
        with monkeypatch.context() as patched:
            patched.setattr(runtime.bundle.probe, "score_logit", broken)
            failed = await client.post("/v1/chat/completions", json=chat(HARMLESS))
            failed_stream = await client.post("/v1/chat/completions", json=chat(HARMLESS, stream=True))
        with monkeypatch.context() as patched:
            patched.setattr(runtime.bundle.stream_probe, "score_logit", breaks_on_third_token)
            mid_stream = sse_events((await client.post("/v1/chat/completions", json=chat(HARMLESS, stream=True))).text)
        after = await client.post("/v1/chat/completions", json=chat(HARMLESS))
        active = await settled(app.state.neuronguard.batch.engine)
    for response in (failed, failed_stream):
        assert response.status_code == 503 and response.json()["error"]["code"] == "guard_error"
        assert "exploded" not in response.text
    assert mid_stream[-2]["error"]["code"] == "guard_error" and mid_stream[-1] == "[DONE]"
    assert after.status_code == 200 and after.json()["guard"]["decision"] == "allow" and active == 0


async def test_a_step_that_raises_fails_its_requests_closed_and_a_new_engine_serves_on(runtime, settings) -> None:
    calls: list[int] = []
    twin = runtime.patch_source.model.base_model  # the decoder stack the patch source runs in each patched step
    original = twin.forward

    def explodes_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # mid-request: after the prefill, while decoding
            raise RuntimeError("step exploded")
        return original(*args, **kwargs)

    guard = {"mode": "block+patch"}
    app = app_for(runtime, settings, engine="batched")
    async with api_client(app) as client:
        first = app.state.neuronguard.batch.engine
        twin.forward = explodes_on_third_step
        try:
            failed = await client.post("/v1/chat/completions", json=chat(HARMLESS, max_tokens=8, guard=guard))
        finally:
            del twin.forward
        after = await client.post("/v1/chat/completions", json=chat(HARMLESS, max_tokens=8, guard=guard))
        ready = await client.get("/ready")
        restarts = metric_sum((await client.get("/metrics")).text, "neuronguard_engine_restarts_total")
        second = app.state.neuronguard.batch.engine
        hooks = count_hooks(runtime.loaded.model)
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "guard_error" and "exploded" not in failed.text
    assert after.status_code == 200 and after.json()["guard"]["decision"] == "allow" and ready.status_code == 200
    assert second is not first and not first.running and restarts == 1
    assert hooks > 0 and count_hooks(runtime.loaded.model) == count_hooks(runtime.patch_source.model) == 0


def test_serve_flag_and_variable_choose_the_engine(monkeypatch) -> None:
    from neuronguard.cli import build_parser

    args = build_parser().parse_args(["serve", "--engine", "batched"])
    assert args.engine == "batched"
    monkeypatch.setenv("NEURONGUARD_ENGINE", "Batched")
    assert Settings().engine == "batched"
    monkeypatch.setenv("NEURONGUARD_ENGINE", "serial")
    assert Settings().engine == "serial"
    monkeypatch.delenv("NEURONGUARD_ENGINE")
    assert Settings().engine == "batched"  # the default; --engine serial is the fallback


def test_sigterm_drains_the_requests_in_flight_on_the_engine_then_exits_0(settings, tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NEURONGUARD_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "neuronguard.cli", "serve", "--engine", "batched", "--model", settings.model,
                             "--bundle", settings.bundle, "--patch-source", str(settings.patch_source), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    results: list[str] = []

    def request(body: dict) -> None:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
            text = response.read().decode()
        results.append("ok" if response.status_code == 200 and '"choices"' in text else f"{response.status_code} {text}")

    bodies = [chat(HARMLESS, max_tokens=120, stream=True, guard={"mode": "block+patch"})]
    bodies += [chat(HARMLESS, max_tokens=60, stream=s) for s in (False, True, False)]
    threads = [threading.Thread(target=request, args=(body,)) for body in bodies]
    try:
        assert wait_ready(base, 120, lambda: proc.poll() is None), (tmp_path / "server.log").read_text()[-2000:]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while metric(base, "neuronguard_running_requests") < len(bodies):  # all four in flight on the engine
            assert time.monotonic() < deadline, "requests did not reach the engine"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    assert results == ["ok"] * len(bodies), results
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]


async def test_an_engine_that_cannot_start_stops_start_up_with_its_reason(runtime, settings, monkeypatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise UsageError("the batching engine needs transformers==5.23.0, found 0.0: install the pinned version "
                         "or run with --engine serial")

    monkeypatch.setattr("neuronguard.server.app.GuardedBatchEngine", refuse)
    errors: list[BaseException] = []
    app = create_app(settings.model_copy(update={"engine": "batched"}), loader=lambda _s: runtime, on_load_error=errors.append)
    async with api_client(app, ready=False) as client:
        deadline = time.perf_counter() + 10
        while not errors and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        ready = await client.get("/ready")
    assert errors and ready.status_code == 503 and "--engine serial" in ready.text
    assert count_hooks(runtime.loaded.model) == 0
