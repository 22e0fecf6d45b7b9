"""Faults: disconnects free their slot, SIGTERM drains and exits 0, a failing hook or probe fails
closed without harming the next request, and broken guard files refuse to load with a clear message.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.load_test import free_port, metric, serve_in_thread
from neuronguard.models.artifact.bundle import MANIFEST, NEURONS, PROBE, STREAM_PROBE
from neuronguard.models import readout
from neuronguard.models.chat import encode_prompt
from neuronguard.models.hooks import count_hooks
from neuronguard.errors import UsageError
from testkit.server_support import app_for, bundle_path, chat, runtime, settings  # noqa: F401 - fixtures
from neuronguard.server.runtime import Runtime, load_runtime
from testkit.server_fixtures import HARMLESS, api_client

ROOT = Path(__file__).resolve().parents[1]


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `check()` holds; fails after `timeout_s`."""
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)
    return time.perf_counter() - start


@contextmanager
def gated_forward(runtime: Runtime) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold the served model's next forward call until `release` is set; `entered` says it started."""
    model = runtime.loaded.model
    original = model.forward
    entered, release = threading.Event(), threading.Event()

    @functools.wraps(original)
    def gated(*args: Any, **kwargs: Any) -> Any:
        if not release.is_set():
            entered.set()
            release.wait(30)
        return original(*args, **kwargs)

    model.forward = gated
    try:
        yield entered, release
    finally:
        release.set()
        del model.forward


def test_disconnect_mid_stream_frees_the_slot_fast(runtime, settings) -> None:
    body = chat(HARMLESS, max_tokens=200, stream=True, guard={"mode": "block+patch"})
    with serve_in_thread(app_for(runtime, settings)) as base:
        before = metric(base, "neuronguard_generation_tokens_total")
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
            assert next(response.iter_lines()).startswith("data: ")
            wait_for(lambda: metric(base, "neuronguard_generation_tokens_total") > before, 10, "decoding")
        freed_s = wait_for(lambda: metric(base, "neuronguard_running_requests") == 0, 10, "the slot to free")
        generated = metric(base, "neuronguard_generation_tokens_total") - before
        after = httpx.post(f"{base}/v1/chat/completions", json=chat(HARMLESS), timeout=30)
    print(f"slot freed {freed_s * 1000:.0f} ms after the disconnect, {generated:.0f} of 200 tokens generated")
    assert freed_s < 2.0 and generated < 150 and after.status_code == 200
    assert count_hooks(runtime.loaded.model) == count_hooks(runtime.patch_source.model) == 0


def test_disconnects_during_prefill_and_queue_wait_cost_at_most_one_step(runtime, settings) -> None:
    # The serial worker's queue; the batching engine's cancel is in tests/test_serve_batching.py.
    with serve_in_thread(app_for(runtime, settings, engine="serial")) as base, gated_forward(runtime) as (entered, release):
        tokens_before = metric(base, "neuronguard_generation_tokens_total")
        prompts_before = metric(base, "neuronguard_prompt_tokens_total")
        in_prefill = _raw_post(base, chat(HARMLESS, max_tokens=100))
        assert entered.wait(10)  # request 1 sits in its prefill forward
        queued = _raw_post(base, chat(HARMLESS, max_tokens=100))
        wait_for(lambda: metric(base, "neuronguard_queue_depth") == 1, 10, "request 2 to queue")
        in_prefill.close()  # both clients go away: one mid-prefill, one waiting in the queue
        queued.close()
        time.sleep(0.3)  # let the server see both disconnects before the forward resumes
        release.set()
        wait_for(lambda: metric(base, "neuronguard_running_requests") == 0
                 and metric(base, "neuronguard_queue_depth") == 0, 10, "both jobs to end")
        generated = metric(base, "neuronguard_generation_tokens_total") - tokens_before
        prompts = metric(base, "neuronguard_prompt_tokens_total") - prompts_before
        after = httpx.post(f"{base}/v1/chat/completions", json=chat(HARMLESS), timeout=30)
    assert generated <= 1  # the prefill finished, then the cancel flag stopped decoding
    assert prompts == len(encode_prompt(runtime.loaded.tokenizer, HARMLESS))  # the queued job never ran
    assert after.status_code == 200 and count_hooks(runtime.loaded.model) == 0


def _raw_post(base: str, body: dict) -> socket.socket:
    """Send a chat request on a bare socket, so the test can drop the connection at a chosen moment."""
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["readout hook", "patch source forward"])
async def test_an_exception_inside_a_hook_fails_closed_and_the_next_request_works(runtime, settings, where) -> None:
    calls: list[int] = []

    def exploding(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 3:  # mid-request: after the prefill, while decoding
                raise RuntimeError("hook exploded")
            return original(*args, **kwargs)

        return wrapper

    guard = {"mode": "block+patch"} if where == "patch source forward" else None
    # The serial decoder's hooks; a failing batched step is in tests/test_serve_batching.py.
    async with api_client(app_for(runtime, settings, engine="serial")) as client:
        if where == "readout hook":
            target, name = readout.ReadoutValues, "_add"
        else:
            target, name = runtime.patch_source.model.base_model, "forward"  # the decoder stack the source runs
        original = getattr(target, name)
        setattr(target, name, exploding(original))
        try:
            failed = await client.post("/v1/chat/completions", json=chat(HARMLESS, max_tokens=8, guard=guard))
        finally:
            if where == "readout hook":
                setattr(target, name, original)
            else:
                del target.forward
        after = await client.post("/v1/chat/completions", json=chat(HARMLESS, max_tokens=8, guard=guard))
        ready = await client.get("/ready")
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "guard_error" and "exploded" not in failed.text
    assert after.status_code == 200 and after.json()["guard"]["decision"] == "allow" and ready.status_code == 200
    assert count_hooks(runtime.loaded.model) == count_hooks(runtime.patch_source.model) == 0


@pytest.mark.anyio
async def test_a_hook_leaked_after_serving_fails_readiness_and_liveness(runtime, settings) -> None:
    """Leaked hooks would reach the next request: the server stops serving, and /health says so, so a restart follows."""
    async with api_client(app_for(runtime, settings, engine="serial")) as client:
        assert (await client.get("/health")).status_code == 200
        handle = runtime.loaded.model.register_forward_hook(lambda *_: None)  # left behind by "a job"
        try:
            first = await client.post("/v1/chat/completions", json=chat(HARMLESS, max_tokens=2))
            after = await client.post("/v1/chat/completions", json=chat(HARMLESS, max_tokens=2))
            health, ready = await client.get("/health"), await client.get("/ready")
        finally:
            handle.remove()
    assert first.status_code == 200 and after.status_code == 503
    assert health.status_code == 503 and health.json()["error"]["code"] == "broken" and "hooks leaked" in health.text
    assert ready.status_code == 503 and "hooks leaked" in ready.text


def _write_json(path: Path, edit: Callable[[dict], Any]) -> None:
    """Rewrite a JSON file after `edit` changed the parsed object in place."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "manifest not JSON": (lambda b: (b / MANIFEST).write_text("{oops"), "not valid JSON"),
    "manifest wrong format": (lambda b: _write_json(b / MANIFEST, lambda d: d.update(format="other/9")), "manifest"),
    "manifest a list": (lambda b: (b / MANIFEST).write_text("[]"), "manifest"),
    "manifest missing": (lambda b: (b / MANIFEST).unlink(), "not a guard bundle"),
    "neurons garbage": (lambda b: (b / NEURONS).write_bytes(os.urandom(256)), "not a valid neuron file"),
    "neurons truncated": (lambda b: (b / NEURONS).write_bytes((b / NEURONS).read_bytes()[:100]), "neuron file"),
    "neurons missing": (lambda b: (b / NEURONS).unlink(), "not found"),
    "probe not JSON": (lambda b: (b / PROBE).write_text('{"format": '), "not valid JSON"),
    "probe NaN weights": (lambda b: _write_json(b / PROBE, lambda d: d["coef"].__setitem__(0, float("nan"))), "non-finite"),
    "probe short vectors": (lambda b: _write_json(b / PROBE, lambda d: d["mean"].pop()), "length k"),
    "probe wrong types": (lambda b: _write_json(b / PROBE, lambda d: d.update(coef="abc")), "probe"),
    "probe threshold > 1": (lambda b: _write_json(b / PROBE, lambda d: d.update(threshold=7)), "not a probability"),
    "probe k too large": (lambda b: _write_json(b / STREAM_PROBE, lambda d: d.update(
        k=10**6, mean=[0.0] * 10**6, scale=[1.0] * 10**6, coef=[0.0] * 10**6)), "neurons"),
    "probe for other neurons": (lambda b: _write_json(b / PROBE, lambda d: d.update(neurons_sha256="0" * 64)),
                                "another neuron file"),
    "bundle for another model": (lambda b: _write_json(b / MANIFEST, lambda d: d["model"].update(config_sha256="f" * 64)),
                                 "another model"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_guard_files_refuse_to_load_with_a_clear_message(settings, tmp_path, case) -> None:
    bundle = shutil.copytree(settings.bundle, tmp_path / "bundle")
    corrupt, expected = BROKEN[case]
    corrupt(bundle)
    with pytest.raises(UsageError, match=expected) as err:
        load_runtime(settings.model_copy(update={"bundle": str(bundle), "patch_source": None}))
    assert "Traceback" not in str(err.value)


def test_manifest_with_a_malformed_model_entry_is_a_usage_error(settings, tmp_path) -> None:
    bundle = shutil.copytree(settings.bundle, tmp_path / "bundle")
    _write_json(bundle / MANIFEST, lambda d: d.update(model="llama"))
    with pytest.raises(UsageError):
        load_runtime(settings.model_copy(update={"bundle": str(bundle), "patch_source": None}))


def test_sigterm_drains_running_and_queued_requests_then_exits_0(settings, tmp_path) -> None:
    """uvicorn re-raised SIGTERM after draining, so `neuronguard serve` died with -15 (seen before the fix)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NEURONGUARD_DEVICE": "cpu"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "neuronguard.cli", "serve", "--model", settings.model,
                             "--bundle", settings.bundle, "--patch-source", str(settings.patch_source),
                             "--port", str(port), "--engine", "serial"],  # its queue; the engine's drain: test_serve_batching
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    results: list[str] = []

    def request(body: dict) -> None:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
            text = response.read().decode()
        results.append("ok" if response.status_code == 200 and ('"choices"' in text) else f"{response.status_code} {text}")

    try:
        wait_for(lambda: _ready(base) or proc.poll() is not None, 120, "the server")
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        slow = chat(HARMLESS, max_tokens=160, stream=True, guard={"mode": "block+patch"})
        threads = [threading.Thread(target=request, args=(slow,))]
        threads += [threading.Thread(target=request, args=(chat(HARMLESS, max_tokens=8, stream=s),)) for s in (False, True, False)]
        threads[0].start()
        wait_for(lambda: metric(base, "neuronguard_running_requests") == 1, 30, "the stream to start")
        for thread in threads[1:]:
            thread.start()
        # All three must be queued: a request still connecting when SIGTERM lands is refused, not drained.
        wait_for(lambda: metric(base, "neuronguard_queue_depth") >= 3, 30, "jobs to queue")
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    assert results == ["ok"] * 4, results
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
