"""Load on a live loopback server (reduced form of bench/load_test.py): no errors but deliberate
503s, every guard decision and score equal to the one the prompt gets alone, no hooks left,
resident memory flat.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.load_test import metric, mixed_workload, run_load, serve_in_thread
from testkit.server_support import app_for, bundle_path, runtime, settings  # noqa: F401 - fixtures
from testkit.server_fixtures import HARMFUL, HARMLESS, api_client

HARMFUL_PROMPTS = [HARMFUL, "Write a poem about the sea.", "A poem about the wind, please."]
HARMLESS_PROMPTS = [HARMLESS, "Mix flour and water", "How do I knead dough?"]
RSS_TOLERANCE_MB = 48.0


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.anyio
async def test_registered_hooks_gauge_reads_the_models_hooks(runtime, settings) -> None:
    """The gauge must show a leaked hook, not just print 0."""
    app = app_for(runtime, settings)
    async with api_client(app) as client:
        await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": HARMLESS}],
                                                        "max_tokens": 4, "stream": True})
        idle = (await client.get("/metrics")).text
        handle = runtime.loaded.model.register_forward_hook(lambda *_: None)
        try:
            leaked = (await client.get("/metrics")).text
        finally:
            handle.remove()
    assert "\nneuronguard_registered_hooks 0.0" in idle and "\nneuronguard_registered_hooks 1.0" in leaked


def test_64_clients_get_the_answers_they_get_alone(runtime, settings) -> None:
    workload = mixed_workload(HARMFUL_PROMPTS, HARMLESS_PROMPTS, max_tokens=6)
    workload += [dict(body, guard={"mode": "block+patch"}) for body in workload[:4]]  # live patching under load too
    workload += [dict(body, guard={"threshold": 0.45}, max_tokens=12) for body in workload[2:4]]  # stream-stage blocks
    with serve_in_thread(app_for(runtime, settings)) as base:
        hooks_before = metric(base, "neuronguard_registered_hooks")
        warmup = asyncio.run(run_load(base, workload, clients=64, requests_each=1))
        rss_warm = rss_mb()
        loaded = asyncio.run(run_load(base, workload, clients=64, requests_each=2))
        rss_after = rss_mb()
        hooks_after = metric(base, "neuronguard_registered_hooks")
        running = metric(base, "neuronguard_running_requests")
    for report in (warmup, loaded):
        assert report.ok, "\n".join((report.errors + report.mismatches)[:5])
        assert report.overloaded == 0  # 64 clients fit the default queue of 64
    finishes = {outcome[1] for outcome in loaded.alone}
    assert loaded.requests == 128 and {"content_filter", "length"} <= finishes  # both kinds of answer were compared
    assert hooks_before == hooks_after == 0 and running == 0
    assert rss_after - rss_warm < RSS_TOLERANCE_MB, (rss_warm, rss_after)


def test_sustained_overload_sheds_with_503_and_answers_the_rest_exactly(runtime, settings) -> None:
    workload = mixed_workload(HARMFUL_PROMPTS, HARMLESS_PROMPTS, max_tokens=6)
    with serve_in_thread(app_for(runtime, settings, max_queue=4)) as base:
        report = asyncio.run(run_load(base, workload, clients=48, requests_each=2))
        ready = metric(base, "neuronguard_ready")
    assert report.ok, "\n".join((report.errors + report.mismatches)[:5])
    assert report.overloaded > 0 and report.requests == 96  # shed, not queued without bound
    assert report.max_queue_depth <= 4 and ready == 1
