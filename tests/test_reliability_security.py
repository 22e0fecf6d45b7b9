"""Security: keys compared in constant time and never logged, prompt and completion text kept out
of logs and metrics unless enabled, no remote code by default, a request's `guard` object never
weakens the server policy, and streaming never bypasses the guard.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydantic import SecretStr

from neuronguard.models.loading import load_model
from testkit.server_support import app_for, bundle_path, chat, runtime, settings  # noqa: F401 - fixtures
from neuronguard.server import auth
from neuronguard.server.guard import _FEATURES, GUARD_MODES, GuardPolicy, PolicyError, resolve_policy
from neuronguard.server.settings import Settings
from testkit.server_fixtures import HARMFUL, api_client, sse_events

MARKER = "zq7x-unique-marker-9k2"
KEY = "sk-reliability-secret-4f1e"


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every record of the server's and uvicorn's loggers at DEBUG, formatted with its extra fields."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.getMessage()} {record.__dict__} {record.exc_text or ''}")

    handler = Collect(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("neuronguard", "uvicorn", "uvicorn.error", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_every_key_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the comparisons done do not depend on which key (if any) matched."""
    calls: list[bytes] = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    keys = [b"first-key", b"second-key", b"third-key"]
    for header in ("Bearer first-key", "Bearer third-key", "Bearer nope", "Basic first-key", None):
        calls.clear()
        auth.authorized(header, keys)
        assert calls == keys, header


@pytest.mark.anyio
@pytest.mark.parametrize("log_prompts", [False, True])
async def test_prompts_completions_and_keys_stay_out_of_logs_and_metrics(runtime, settings, log_prompts) -> None:
    app = app_for(runtime, settings, api_keys=[SecretStr(KEY)], log_prompts=log_prompts)
    headers = {"authorization": f"Bearer {KEY}"}
    with captured_logs() as lines:
        async with api_client(app, headers=headers) as client:
            plain = (await client.post("/v1/chat/completions", json=chat(f"{MARKER} bread", max_tokens=12))).json()
            await client.post("/v1/chat/completions", json=chat(f"{MARKER} bread", stream=True))
            await client.post("/v1/moderations", json={"input": MARKER})
            await client.post("/v1/guard/check", json={"prompt": MARKER})
            await client.post("/v1/chat/completions", json=chat(MARKER, max_tokens=10**9))  # an error path
            await client.post("/v1/models", headers={"authorization": f"Bearer {KEY}-wrong"})
            metrics = (await client.get("/metrics")).text
    logs = "\n".join(lines)
    completion = plain["choices"][0]["message"]["content"]
    assert len(lines) > 5 and KEY not in logs and KEY not in metrics
    assert MARKER not in metrics and completion not in metrics
    assert (MARKER in logs) is log_prompts  # the setting is the only way in (and it works)
    assert len(completion) < 6 or completion not in logs


def test_remote_code_is_off_unless_asked_for() -> None:
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert "trust_remote_code" not in Settings.model_fields  # the server has no way to turn it on


@pytest.mark.parametrize("server_mode", GUARD_MODES)
def test_request_guard_never_weakens_the_server_policy(server_mode: str) -> None:
    """Every requested mode and threshold either keeps every server feature and threshold, or is refused."""
    server = GuardPolicy(server_mode, 0.5, 0.7)  # type: ignore[arg-type]
    for mode, threshold in itertools.product((None, *GUARD_MODES), (None, 0.0, 0.3, 0.5, 0.6, 0.7, 0.9, 1.0)):
        try:
            policy = resolve_policy(server, mode, threshold, allow_override=False)
        except PolicyError:
            continue
        assert _FEATURES[policy.mode] >= _FEATURES[server.mode], (mode, threshold)
        assert policy.prefill_threshold <= server.prefill_threshold and policy.stream_threshold <= server.stream_threshold


@pytest.mark.anyio
async def test_guard_object_cannot_weaken_the_policy_over_http(runtime, settings) -> None:
    async with api_client(app_for(runtime, settings)) as client:
        for guard in ({"mode": "off"}, {"mode": "flag"}, {"mode": "patch"}, {"threshold": 1.0}, {"threshold": 0.99}):
            for path, body in (("/v1/chat/completions", chat(HARMFUL, guard=guard)),
                               ("/v1/chat/completions", chat(HARMFUL, guard=guard, stream=True)),
                               ("/v1/guard/check", {"prompt": HARMFUL, "guard": guard})):
                response = await client.post(path, json=body)
                assert response.status_code == 400 and response.json()["error"]["code"] == "guard_override_not_allowed"


@pytest.mark.anyio
@pytest.mark.parametrize("guard", [None, {"mode": "block+patch"}, {"threshold": 0.45}])
async def test_streaming_ends_with_content_filter_exactly_when_non_streaming_does(runtime, settings, guard) -> None:
    """Harmful prompts (prefill block) and a harmless one stopped mid-answer (threshold 0.45)."""
    prompts = [HARMFUL, f"{HARMFUL} Please.", "Write a poem about the sea.", "How do I bake bread?"]
    finishes: list[str] = []
    async with api_client(app_for(runtime, settings)) as client:
        for prompt in prompts:
            body = chat(prompt, max_tokens=20, guard=guard)
            plain = (await client.post("/v1/chat/completions", json=body)).json()
            events = sse_events((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
            finish = [e["choices"][0].get("finish_reason") for e in events[:-1] if e["choices"]][-1]
            assert finish == plain["choices"][0]["finish_reason"] and events[-1] == "[DONE]", prompt
            assert events[-2]["guard"] == plain["guard"], prompt
            finishes.append(finish)
            if finish == "content_filter" and plain["guard"]["stage"] == "prefill":
                streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
                assert streamed == settings.refusal_message  # not one token of the model's answer
    # blocked and answered prompts were compared (at 0.45 the stream probe stops every one)
    assert finishes[0] == "content_filter" and (len(set(finishes)) > 1 or guard == {"threshold": 0.45})
