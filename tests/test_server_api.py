"""API tests: the real app with its lifespan, over ASGI, on a tiny random model and a planted bundle.

Expected values come from the model layer run directly (same prompt, greedy), so these
tests check invariants: the guard never changes an allowed answer, stops exactly at the
first token over the threshold, and concurrent requests never see each other's hooks.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from pydantic import SecretStr

from neuronguard.models.chat import encode_prompt
from neuronguard.models.generation import PatchSource, SamplingParams, decode, generate_ids, left_pad
from neuronguard.models.hooks import count_hooks
from neuronguard.models.loading import load_model
from neuronguard.cli import main as cli_main
from neuronguard.errors import UsageError
from neuronguard.server.app import create_app
from neuronguard.server.runtime import Runtime, load_runtime, preflight
from neuronguard.server.settings import Settings
from testkit.server_fixtures import HARMFUL, HARMLESS, STREAM_K, api_client, sse_events
from testkit.server_support import (  # noqa: F401 - fixtures
    anyio_backend, app_for, bundle_path, runtime, same_up_to_rounding, settings)
from testkit.tiny_models import build_tiny

pytestmark = pytest.mark.anyio
TOKENS = 12


def chat(content: str, **extra) -> dict:
    return {"model": "anything", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": TOKENS, **extra}


def greedy(runtime: Runtime, prompt: str, steps: int, patch_source: PatchSource | None = None) -> list[int]:
    loaded = runtime.loaded
    batch = left_pad([encode_prompt(loaded.tokenizer, prompt)], loaded.tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=steps, stop_token_ids=runtime.stop_token_ids)
    return generate_ids(loaded.model, batch, params, patch_source=patch_source)[0]


def text_of(runtime: Runtime, ids: list[int]) -> str:
    return runtime.loaded.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream_scores(runtime: Runtime, prompt: str, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the stream probe's score on each of them (the next step's input)."""
    loaded = runtime.loaded
    batch = left_pad([encode_prompt(loaded.tokenizer, prompt)], loaded.tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=steps + 1, stop_token_ids=runtime.stop_token_ids)
    tokens, scores = [], []
    for step in decode(loaded.model, batch, params, probe=runtime.probe_selection):
        if step.index > 0:
            scores.append(float(runtime.stream_probe.score(step.probe_activations[:, :STREAM_K])[0]))
        tokens.append(int(step.tokens[0]))
    return tokens[:steps], scores


async def test_allowed_chat_is_the_unguarded_answer(runtime, settings) -> None:
    expected = text_of(runtime, greedy(runtime, HARMLESS, TOKENS))
    async with api_client(app_for(runtime, settings)) as client:
        body = (await client.post("/v1/chat/completions", json=chat(HARMLESS))).json()
        streamed = sse_events((await client.post("/v1/chat/completions", json=chat(
            HARMLESS, stream=True, stream_options={"include_usage": True}))).text)
        off = (await client.post("/v1/chat/completions", json=chat(HARMLESS, guard={"mode": "off"})))
    assert body["model"] == runtime.served_name and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["guard"]["decision"] == "allow" and body["guard"]["score"] < 0.5
    assert body["usage"]["prompt_tokens"] == len(encode_prompt(runtime.loaded.tokenizer, HARMLESS))
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert streamed[-1] == "[DONE]" and streamed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed[:-1] if e["choices"]) == expected
    assert streamed[-2]["usage"] == body["usage"] and streamed[-2]["choices"] == []
    assert streamed[-3]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert off.status_code == 400 and off.json()["error"]["param"] == "guard.mode"  # weaker than the server: refused


async def test_harmful_prompt_is_refused_before_the_first_token(runtime, settings) -> None:
    async with api_client(app_for(runtime, settings)) as client:
        body = (await client.post("/v1/chat/completions", json=chat(HARMFUL))).json()
        events = sse_events((await client.post("/v1/chat/completions", json=chat(HARMFUL, stream=True))).text)
        flagged = (await client.post("/v1/chat/completions", json=chat(HARMFUL)))
        metrics = (await client.get("/metrics")).text
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["choices"][0]["message"]["content"] == settings.refusal_message
    assert body["guard"] | {"score": 0} == {"mode": "block", "stage": "prefill", "decision": "block", "score": 0,
                                            "threshold": 0.5, "flagged": True, "patched": False}
    assert body["guard"]["score"] == pytest.approx(0.8808, abs=1e-3) and body["usage"]["completion_tokens"] == 0
    contents = [e["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert contents == ["", settings.refusal_message, None] and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter" and events[-2]["guard"]["stage"] == "prefill"
    assert flagged.status_code == 200
    assert 'neuronguard_guard_decisions_total{decision="block",stage="prefill"} 3.0' in metrics


async def test_stream_probe_stops_generation_at_the_first_token_over_threshold(runtime, settings) -> None:
    threshold = 0.45
    tokens, scores = stream_scores(runtime, HARMLESS, 20)
    first_over = next(i for i, s in enumerate(scores) if s >= threshold)  # scores[i] is the score of tokens[i]
    assert first_over >= 2 and 1 not in tokens[: first_over + 1]  # the fixture stops mid-answer, not at once
    guard = {"threshold": threshold}
    async with api_client(app_for(runtime, settings)) as client:
        body = (await client.post("/v1/chat/completions", json=chat(HARMLESS, max_tokens=20, guard=guard))).json()
        events = sse_events((await client.post("/v1/chat/completions", json=chat(
            HARMLESS, max_tokens=20, guard=guard, stream=True))).text)
        flag_only = (await client.post("/v1/chat/completions", json=chat(
            HARMLESS, max_tokens=20, guard={"threshold": threshold, "mode": "block+patch"})))
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["guard"]["stage"] == "stream" and body["guard"]["score"] == pytest.approx(scores[first_over], abs=1e-5)
    assert body["usage"]["completion_tokens"] == first_over
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert streamed == text_of(runtime, tokens[:first_over])  # nothing at or after the flagged token leaks
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter" and events[-1] == "[DONE]"
    assert flag_only.status_code == 200 and flag_only.json()["guard"]["patched"] is True


async def test_flag_mode_answers_and_reports(runtime, settings) -> None:
    expected = text_of(runtime, greedy(runtime, HARMFUL, TOKENS))
    async with api_client(app_for(runtime, settings, guard_mode="flag")) as client:
        body = (await client.post("/v1/chat/completions", json=chat(HARMFUL))).json()
        stricter = (await client.post("/v1/chat/completions", json=chat(HARMFUL, guard={"mode": "block"}))).json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["guard"]["decision"] == "flag" and body["guard"]["flagged"]
    assert stricter["choices"][0]["finish_reason"] == "content_filter"


async def test_override_setting_allows_turning_the_guard_off(runtime, settings) -> None:
    async with api_client(app_for(runtime, settings, allow_guard_override=True)) as client:
        body = (await client.post("/v1/chat/completions", json=chat(HARMFUL, guard={"mode": "off"}))).json()
    assert body["choices"][0]["message"]["content"] == text_of(runtime, greedy(runtime, HARMFUL, TOKENS))
    assert "guard" not in body


async def test_patch_mode_with_all_neurons_answers_like_the_aligned_twin(settings, tiny_twin_path) -> None:
    everything = settings.model_copy(update={"patch_k": 192, "guard_mode": "patch"})  # 3 layers x 64 neurons
    rt = load_runtime(everything)
    twin = load_model(tiny_twin_path)

    def twin_answer(prompt: str) -> str:
        batch = left_pad([encode_prompt(twin.tokenizer, prompt)], twin.tokenizer.pad_token_id)
        return text_of(rt, generate_ids(twin.model, batch, SamplingParams(TOKENS, stop_token_ids=rt.stop_token_ids))[0])

    candidates = [HARMLESS, HARMFUL, "Sure, here is a short summary", "I'm sorry", "Mix flour and water", "stars"]
    prompt = next(p for p in candidates if twin_answer(p) != text_of(rt, greedy(rt, p, TOKENS)))  # the twins differ
    async with api_client(create_app(everything, loader=lambda _s: rt)) as client:
        body = (await client.post("/v1/chat/completions", json=chat(prompt))).json()
        metrics = (await client.get("/metrics")).text
    assert body["choices"][0]["message"]["content"] == twin_answer(prompt) and body["guard"]["patched"]
    patched = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("neuronguard_patched_tokens_total")))
    assert patched >= len(encode_prompt(rt.loaded.tokenizer, prompt)) + body["usage"]["completion_tokens"] - 1
    assert count_hooks(rt.loaded.model) == 0 and count_hooks(rt.patch_source.model) == 0


async def test_moderations_and_guard_check_score_the_prefill(runtime, settings) -> None:
    async with api_client(app_for(runtime, settings)) as client:
        batch = (await client.post("/v1/moderations", json={"input": [HARMFUL, HARMLESS], "model": "x"})).json()
        single = (await client.post("/v1/moderations", json={"input": HARMLESS})).json()
        check = (await client.post("/v1/guard/check", json={"messages": [{"role": "user", "content": HARMFUL}]})).json()
        by_prompt = (await client.post("/v1/guard/check", json={"prompt": HARMLESS})).json()
        both = await client.post("/v1/guard/check", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert [r["flagged"] for r in batch["results"]] == [True, False] and batch["model"] == runtime.served_name
    scores = [r["category_scores"]["harmful"] for r in batch["results"]]
    assert scores == pytest.approx([0.8808, 0.1192], abs=1e-3)
    assert single["results"][0]["category_scores"]["harmful"] == pytest.approx(scores[1], abs=1e-5)
    assert check["flagged"] and check["decision"] == "block" and check["threshold"] == 0.5 and check["neurons_used"] == 16
    assert check["score"] == pytest.approx(scores[0], abs=1e-5) and check["latency_ms"] > 0
    contributions = [c["contribution"] for c in check["top_contributions"]]
    assert len(contributions) == 10 and [abs(c) for c in contributions] == sorted(map(abs, contributions), reverse=True)
    selection = runtime.bundle.neurons.top(16)
    pairs = set(zip(selection.layer.tolist(), selection.index.tolist()))
    assert all((c["layer"], c["index"]) in pairs for c in check["top_contributions"])
    assert by_prompt["decision"] == "allow" and not by_prompt["flagged"]
    assert both.status_code == 400


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),  # n > 1 works, up to 16
        ({"messages": [{"role": "user", "content": "x"}], "guard": {"threshold": 0.9}}, 400, "guard.threshold"),
        ({"messages": [{"role": "user", "content": "bread " * 300}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 250}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x" * 3000}]}, 413, None),
    ],
)
async def test_errors_use_the_openai_envelope(runtime, settings, payload, status, param) -> None:
    async with api_client(app_for(runtime, settings, max_body_bytes=2048)) as client:
        if isinstance(payload, bytes):
            response = await client.post("/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
        else:
            response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "Traceback" not in response.text


async def test_chunked_body_over_the_limit_is_413_and_unknown_paths_404(runtime, settings) -> None:
    async def chunks():
        for _ in range(4):
            yield b"x" * 1024

    async with api_client(app_for(runtime, settings, max_body_bytes=2048)) as client:
        big = await client.post("/v1/moderations", content=chunks())
        missing = await client.get("/v1/nothing/here")
        metrics = (await client.get("/metrics")).text
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert 'endpoint="unmatched",status="404"' in metrics and "/v1/nothing" not in metrics


async def test_api_keys_protect_v1_but_not_probes(runtime, settings) -> None:
    async with api_client(app_for(runtime, settings, api_keys=[SecretStr("s3cret"), SecretStr("other")])) as client:
        missing = await client.get("/v1/models")
        wrong = await client.post("/v1/chat/completions", content=b"{bad", headers={"authorization": "Bearer nope"})
        ok = await client.get("/v1/models", headers={"authorization": "Bearer other"})
        open_paths = [(await client.get(p)).status_code for p in ("/health", "/ready", "/metrics")]
    assert missing.status_code == wrong.status_code == 401  # auth before parsing
    assert missing.json()["error"]["type"] == "authentication_error" and "s3cret" not in missing.text
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == runtime.served_name
    assert open_paths == [200, 200, 200]


async def test_ready_is_503_until_loaded_and_after_a_failed_load(runtime, settings) -> None:
    gate = threading.Event()

    def slow_loader(_settings: Settings) -> Runtime:
        gate.wait(30)
        return runtime

    async with api_client(create_app(settings, loader=slow_loader), ready=False) as client:
        assert (await client.get("/health")).status_code == 200
        not_ready = await client.get("/ready")
        refused = await client.post("/v1/chat/completions", json=chat(HARMLESS))
        assert "neuronguard_ready 0.0" in (await client.get("/metrics")).text
        gate.set()
        for _ in range(500):
            if (await client.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/ready")).status_code == 200
        assert "neuronguard_ready 1.0" in (await client.get("/metrics")).text
    assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
    assert refused.status_code == 503 and refused.headers["retry-after"]

    errors: list[BaseException] = []

    def failing(_settings: Settings) -> Runtime:
        raise UsageError("bundle 'b' was built for another model")

    async with api_client(create_app(settings, loader=failing, on_load_error=errors.append), ready=False) as client:
        for _ in range(500):
            if errors:
                break
            await asyncio.sleep(0.01)
        response = await client.get("/ready")
    assert response.status_code == 503 and "built for another model" in response.json()["error"]["message"]


def test_bundle_for_another_model_stops_start_up(settings, tmp_path, capsys) -> None:
    other = build_tiny(tmp_path / "mistral", "mistral")
    with pytest.raises(UsageError, match="built for another model"):
        preflight(settings.model_copy(update={"model": str(other)}))
    with pytest.raises(UsageError, match="for another model"):
        load_runtime(settings.model_copy(update={"model": str(other), "patch_source": None}))
    assert cli_main(["serve", "--model", str(other), "--bundle", settings.bundle, "--port", "1"]) == 2
    assert "built for another model" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["serial", "batched"])
async def test_concurrent_requests_never_see_each_others_hooks(runtime, settings, engine) -> None:
    requests = [
        ("/v1/chat/completions", chat(HARMLESS)),
        ("/v1/chat/completions", chat(HARMLESS, guard={"mode": "block+patch"})),
        ("/v1/chat/completions", chat(HARMFUL, stream=True)),
        ("/v1/chat/completions", chat(HARMLESS, guard={"threshold": 0.45}, stream=True, max_tokens=20)),
        ("/v1/moderations", {"input": [HARMLESS, HARMFUL]}),
        ("/v1/guard/check", {"prompt": HARMFUL}),
        ("/v1/chat/completions", chat("Write a poem", temperature=0.9, seed=7)),
    ]

    def comparable(response: httpx.Response):
        if response.headers["content-type"].startswith("text/event-stream"):
            return [(e["choices"], e.get("guard")) for e in sse_events(response.text)[:-1]]
        body = response.json()
        for volatile in ("id", "created", "latency_ms"):
            body.pop(volatile, None)
        return body

    async with api_client(app_for(runtime, settings, engine=engine)) as client:
        alone = [comparable(await client.post(path, json=body)) for path, body in requests]
        together = await asyncio.gather(*(client.post(path, json=body) for path, body in requests * 2))
    outcomes, expected = [comparable(r) for r in together], alone * 2
    differ = [i for i, (got, want) in enumerate(zip(outcomes, expected)) if not same_up_to_rounding(got, want)]
    assert not differ, [(outcomes[i], expected[i]) for i in differ[:2]]
    assert count_hooks(runtime.loaded.model) == 0 and count_hooks(runtime.patch_source.model) == 0


async def test_full_queue_answers_503_with_retry_after(runtime, settings) -> None:
    app = app_for(runtime, settings, max_queue=1, engine="serial")  # the worker's queue (the engine's cap: max_queue too)
    gate = threading.Event()
    async with api_client(app) as client:
        scheduler = app.state.neuronguard.scheduler
        blocker = scheduler.submit(lambda ctx: gate.wait(30))
        while app.state.neuronguard.metrics.running._value.get() != 1:
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(HARMLESS)))
        while app.state.neuronguard.metrics.queue_depth._value.get() != 1:
            await asyncio.sleep(0.001)
        rejected = await client.post("/v1/moderations", json={"input": "x"})
        gate.set()
        await blocker.result()
        assert (await queued).status_code == 200
    assert rejected.status_code == 503 and rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "overloaded"


async def test_a_failing_probe_blocks_the_request_and_the_next_one_works(runtime, settings, monkeypatch) -> None:
    def broken(_logit: float) -> float:
        raise RuntimeError("probe exploded")

    calls = []
    stream_score = runtime.bundle.stream_probe.score_logit

    def breaks_on_third_token(logit: float) -> float:
        calls.append(1)
        return broken(logit) if len(calls) == 3 else stream_score(logit)

    # The serial worker (no hooks left after a failure); the engine's case is in tests/test_serve_batching.py.
    async with api_client(app_for(runtime, settings, engine="serial")) as client:
        with monkeypatch.context() as patched:
            patched.setattr(runtime.bundle.probe, "score_logit", broken)
            failed = await client.post("/v1/chat/completions", json=chat(HARMLESS))
            failed_stream = await client.post("/v1/chat/completions", json=chat(HARMLESS, stream=True))
        with monkeypatch.context() as patched:
            patched.setattr(runtime.bundle.stream_probe, "score_logit", breaks_on_third_token)
            mid_stream = sse_events((await client.post("/v1/chat/completions", json=chat(HARMLESS, stream=True))).text)
        assert count_hooks(runtime.loaded.model) == 0
        after = await client.post("/v1/chat/completions", json=chat(HARMLESS))
        ready = await client.get("/ready")
    for response in (failed, failed_stream):
        assert response.status_code == 503 and response.json()["error"]["code"] == "guard_error"
        assert "exploded" not in response.text
    assert mid_stream[-2]["error"]["code"] == "guard_error" and mid_stream[-1] == "[DONE]"
    released = "".join(e["choices"][0]["delta"].get("content") or "" for e in mid_stream[:-2])
    assert released == text_of(runtime, greedy(runtime, HARMLESS, 2))  # only the tokens scored before the failure
    assert after.status_code == 200 and after.json()["guard"]["decision"] == "allow" and ready.status_code == 200


async def test_metrics_cover_every_series_with_bounded_labels(runtime, settings) -> None:
    async with api_client(app_for(runtime, settings)) as client:
        await client.post("/v1/chat/completions", json=chat(HARMLESS, stream=True))
        await client.post("/v1/chat/completions", json=chat(HARMFUL))
        text = (await client.get("/metrics")).text
    for name in ("neuronguard_requests_total", "neuronguard_request_duration_seconds_bucket",
                 "neuronguard_time_to_first_token_seconds_bucket", "neuronguard_inter_token_latency_seconds_bucket",
                 "neuronguard_prompt_tokens_total", "neuronguard_generation_tokens_total",
                 "neuronguard_guard_decisions_total", "neuronguard_probe_score_bucket",
                 "neuronguard_probe_latency_seconds_bucket", "neuronguard_patched_tokens_total",
                 "neuronguard_queue_depth", "neuronguard_running_requests", "neuronguard_ready",
                 "neuronguard_model_info"):
        assert f"\n{name}" in text, name
    assert 'neuronguard_requests_total{endpoint="/v1/chat/completions",status="200"} 2.0' in text
    assert 'neuronguard_guard_decisions_total{decision="allow",stage="prefill"} 1.0' in text
    assert 'neuronguard_guard_decisions_total{decision="allow",stage="stream"} 1.0' in text
    assert f'neuronguard_model_info{{bundle="test-bundle",model="{runtime.served_name}"}} 1.0' in text
    assert HARMLESS not in text
