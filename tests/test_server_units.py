"""Server building blocks without a model: guard policy, settings, auth, text streaming, both schedulers."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from neuronguard.models.organism import ORGANISM_DIR
from neuronguard.server.auth import authorized, needs_auth
from neuronguard.server.guard import GuardPolicy, PolicyError, is_stricter_or_equal, resolve_policy
from neuronguard.server.metrics import Metrics
from neuronguard.models.engine import EngineRequest, FinishedEvent, TokenEvent
from neuronguard.server.scheduler import BatchScheduler, EngineStopped, Overloaded, Scheduler
from neuronguard.server.settings import Settings
from neuronguard.server.text import TextStream
from testkit.tiny_models import make_tokenizer

SERVER = GuardPolicy("block", 0.5, 0.8)


def test_requests_may_only_tighten_the_guard() -> None:
    assert is_stricter_or_equal("block+patch", "block") and is_stricter_or_equal("block", "flag")
    assert not is_stricter_or_equal("flag", "block") and not is_stricter_or_equal("block", "patch")
    for mode in ("off", "flag", "patch"):
        with pytest.raises(PolicyError) as err:
            resolve_policy(SERVER, mode, None, allow_override=False)
        assert err.value.param == "guard.mode"
    with pytest.raises(PolicyError) as err:
        resolve_policy(SERVER, None, 0.6, allow_override=False)
    assert err.value.param == "guard.threshold"
    # A lower threshold applies to both stages, never loosening the stream stage.
    assert resolve_policy(SERVER, "block+patch", 0.3, allow_override=False) == GuardPolicy("block+patch", 0.3, 0.3)
    assert resolve_policy(GuardPolicy("block", 0.5, 0.2), None, 0.4, allow_override=False).stream_threshold == 0.2
    assert resolve_policy(SERVER, "off", 0.9, allow_override=True) == GuardPolicy("off", 0.9, 0.9)


def test_decisions_follow_mode_and_stage_thresholds() -> None:
    assert SERVER.decide(0.49, "prefill") == "allow" and SERVER.decide(0.5, "prefill") == "block"
    assert SERVER.decide(0.7, "stream") == "allow" and SERVER.decide(0.8, "stream") == "block"
    assert GuardPolicy("flag", 0.5, 0.5).decide(0.9, "prefill") == "flag"
    assert GuardPolicy("patch", 0.5, 0.5).decide(0.9, "stream") == "flag"
    off = GuardPolicy("off", 0.5, 0.5)
    assert not off.scores and not off.blocks and not off.patches


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURONGUARD_API_KEYS", "k1, k2")
    monkeypatch.setenv("NEURONGUARD_PATCH_SOURCE", "none")
    monkeypatch.setenv("NEURONGUARD_GUARD_MODE", "block+patch")
    monkeypatch.setenv("NEURONGUARD_MAX_QUEUE", "3")
    monkeypatch.setenv("NEURONGUARD_ALLOW_GUARD_OVERRIDE", "true")
    settings = Settings()
    assert settings.key_values() == [b"k1", b"k2"] and settings.patch_source is None
    assert settings.guard_mode == "block+patch" and settings.max_queue == 3 and settings.allow_guard_override
    assert "k1" not in repr(settings)  # keys never show up in logs or reprs
    monkeypatch.setenv("NEURONGUARD_API_KEYS", '["a", "b"]')
    assert Settings().key_values() == [b"a", b"b"]
    assert Settings().model.endswith("organism/unaligned") and Settings().host == "127.0.0.1" and Settings().port == 8000


def test_bearer_auth() -> None:
    keys = [b"secret-1", b"secret-2"]
    assert authorized("Bearer secret-2", keys) and authorized("bearer secret-1", keys)
    for header in (None, "", "Bearer", "Bearer secret", "Basic secret-1", "secret-1", "Bearer secret-10"):
        assert not authorized(header, keys)
    assert needs_auth("/v1/models", keys) and not needs_auth("/metrics", keys) and not needs_auth("/v1/models", [])


def test_text_stream_holds_back_possible_stop_strings() -> None:
    tok = make_tokenizer()
    ids = tok.encode("Mix flour, water and yeast", add_special_tokens=False)
    stream = TextStream(tok, ["water"])
    released, stopped = "", False
    for token in ids:
        delta, stopped = stream.push(token)
        released += delta
        assert "wat" not in released  # a stop string's prefix is never released early
        if stopped:
            break
    assert stopped and released == "Mix flour, " and stream.text == released
    plain = TextStream(tok)
    text = "".join(plain.push(t)[0] for t in ids) + plain.flush()
    assert text == "Mix flour, water and yeast"


def test_scheduler_bounds_queue_isolates_failures_and_cancels() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        scheduler = Scheduler(metrics, max_queue=1)
        gate = threading.Event()
        blocker = scheduler.submit(lambda ctx: gate.wait(10) and "released")
        while metrics.running._value.get() != 1:  # bounded by the test timeout
            await asyncio.sleep(0.001)
        queued = scheduler.submit(lambda ctx: 1 / 0)
        with pytest.raises(Overloaded):
            scheduler.submit(lambda ctx: None)
        gate.set()
        assert await blocker.result() == "released"
        with pytest.raises(ZeroDivisionError):
            await queued.result()  # a failing job reaches its caller; the worker lives on

        steps: list[int] = []

        def long_job(ctx):
            for i in range(10_000):
                ctx.check()
                steps.append(i)
                ctx.emit(i)
                gate.clear()
                gate.wait(0.01)
            return "finished"

        handle = scheduler.submit(long_job)
        async for event in handle.events():
            if event == 2:
                handle.cancel()
        assert handle.value is None and len(steps) < 50
        assert await scheduler.submit(lambda ctx: "next").result() == "next"
        scheduler.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("seed", range(5))
def test_text_stream_equals_one_full_decode(seed: int) -> None:
    tok = AutoTokenizer.from_pretrained(ORGANISM_DIR / "unaligned")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tok.vocab_size, (400,), generator=gen).tolist()  # random byte-level tokens: split characters
    ids += tok.encode("naïve café — 東京 🙂 done", add_special_tokens=False)
    stream = TextStream(tok)
    released = "".join(stream.push(t)[0] for t in ids) + stream.flush()
    assert released == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert stream.text == released


class _FakeEngine:
    """The part of GuardedBatchEngine the bridge uses: submit with a sink, cancel (which reports the cancel)."""

    running = True

    def __init__(self) -> None:
        self.sinks: dict[str, Any] = {}
        self.cancelled: list[str] = []

    def submit(self, _request: EngineRequest, sink: Any, request_id: str) -> None:
        self.sinks[request_id] = sink

    def cancel(self, request_id: str) -> None:
        if request_id in self.sinks and request_id not in self.cancelled:
            self.cancelled.append(request_id)
            self.sinks[request_id](FinishedEvent(request_id, "cancelled", 0))


class _StopAt:
    """A consumer that ends its request at step `at` (a block) or raises there (a guard failure)."""

    def __init__(self, at: int, fail: bool = False) -> None:
        self.at, self.fail, self.seen = at, fail, []

    def step(self, event: TokenEvent) -> bool:
        if self.fail and event.index == self.at:
            raise RuntimeError("probe exploded")
        self.seen.append(event.token)
        return event.index == self.at

    def result(self) -> list[int]:
        return self.seen


def test_batch_bridge_bounds_in_flight_cancels_on_block_failure_and_disconnect() -> None:
    async def scenario() -> None:
        metrics, engine = Metrics(), _FakeEngine()
        bridge = BatchScheduler(engine, metrics, max_requests=3)  # type: ignore[arg-type]
        request = EngineRequest((5, 6), patch=True)
        blocked = bridge.submit(request, lambda _ctx: _StopAt(1))
        failing = bridge.submit(request, lambda _ctx: _StopAt(0, fail=True))
        gone = bridge.submit(request, lambda _ctx: _StopAt(99))
        with pytest.raises(Overloaded):
            bridge.submit(request, lambda _ctx: _StopAt(0))
        assert metrics.running._value.get() == 3 and bridge.patched_in_flight == 3
        for index in range(4):  # the engine steps on; ended requests ignore what it still sends
            for rid in ("job-0", "job-1", "job-2"):
                engine.sinks[rid](TokenEvent(rid, index, 10 + index, None, False))
        assert await blocked.result() == [10, 11]  # stopped at its block, the rest not seen
        with pytest.raises(RuntimeError, match="exploded"):
            await failing.result()
        gone.cancel()  # the client went away
        assert await gone.result() is None
        assert engine.cancelled == ["job-1", "job-0", "job-2"]  # failure at step 0, block at step 1, then the client
        assert metrics.running._value.get() == 0 and bridge.patched_in_flight == 0

    asyncio.run(scenario())


def test_batch_bridge_replaces_a_stopped_engine_or_says_it_cannot() -> None:
    async def scenario() -> None:
        metrics, dead, fresh = Metrics(), _FakeEngine(), _FakeEngine()
        dead.running = False
        dead.shutdown = lambda **_kwargs: dead.cancelled.append("shutdown")  # type: ignore[attr-defined]
        bridge = BatchScheduler(dead, metrics, max_requests=4, restart=lambda: fresh)  # type: ignore[arg-type]
        handle = bridge.submit(EngineRequest((5, 6)), lambda _ctx: _StopAt(0))
        assert bridge.engine is fresh and "job-0" in fresh.sinks and dead.cancelled == ["shutdown"]
        assert metrics.engine_restarts._value.get() == 1
        fresh.sinks["job-0"](TokenEvent("job-0", 0, 7, None, False))
        assert await handle.result() == [7]  # the request ran on the new engine

        told: list[int] = []
        stuck = BatchScheduler(dead, metrics, max_requests=4, on_stopped=lambda: told.append(1))  # type: ignore[arg-type]
        for _ in range(2):
            with pytest.raises(EngineStopped):
                stuck.submit(EngineRequest((5, 6)), lambda _ctx: _StopAt(0))
        assert told == [1] and metrics.running._value.get() == 0  # told once; nothing left counted in flight

    asyncio.run(scenario())
