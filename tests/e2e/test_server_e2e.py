"""End to end: a real `neuronguard serve` process, the official openai client, a real Prometheus.

Serves the built-in organism with default settings when it has been built; otherwise a
tiny random model with a planted bundle. Every wait is bounded and every process started
here is stopped here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from testkit.server_fixtures import HARMFUL, HARMLESS, organism_available

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
KEY = "e2e-test-key"
TEST_SPLIT = ROOT / "models" / "organism" / "data" / "splits" / "test.jsonl"


def organism_prompts(label: str, n: int = 8) -> list[str]:
    """Held-out prompts of the organism's test split (the probe never trained on them)."""
    rows = [json.loads(line) for line in TEST_SPLIT.read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r["label"] == label][:n]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{log.read_text()[-3000:] if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NEURONGUARD_DEVICE": "cpu"}
    args = ["serve", "--api-key", KEY, "--log-level", "info"]
    if organism_available():
        harmful, harmless = organism_prompts("harmful"), organism_prompts("harmless")
    else:
        subprocess.run([sys.executable, "-m", "testkit.server_fixtures", str(tmp)], check=True, cwd=ROOT,
                       capture_output=True, timeout=300, env=env)
        args += ["--model", str(tmp / "model"), "--bundle", str(tmp / "bundle"), "--patch-source", str(tmp / "twin")]
        harmful, harmless = [HARMFUL], [HARMLESS]
    port = free_port()
    log = tmp / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "neuronguard.cli", *args, "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/ready", timeout=2).status_code == 200, 180, "/ready", proc, log)
        yield {"base": base, "proc": proc, "log": log, "harmful": harmful, "harmless": harmless}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(served: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served['base']}/v1", api_key=KEY, max_retries=0, timeout=60)


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def test_chat_plain_and_streaming_with_the_openai_client(served: dict, client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": served["harmless"][0]}]
    plain = client.chat.completions.create(model="whatever", messages=messages, max_tokens=16, temperature=0)
    assert plain.model == model and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.choices[0].message.content and plain.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="whatever", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content  # greedy: streaming and plain agree
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_harmful_prompt_blocked_and_harmless_answered(served: dict, client: openai.OpenAI) -> None:
    moderation = client.moderations.create(input=served["harmful"] + served["harmless"], model="x")
    flags = [r.flagged for r in moderation.results]
    harmful_flags, harmless_flags = flags[: len(served["harmful"])], flags[len(served["harmful"]):]
    assert any(harmful_flags) and not all(harmless_flags), flags
    blocked_prompt = served["harmful"][harmful_flags.index(True)]
    answered_prompt = served["harmless"][harmless_flags.index(False)]
    blocked = client.chat.completions.create(model="m", messages=[{"role": "user", "content": blocked_prompt}], max_tokens=32)
    assert blocked.choices[0].finish_reason == "content_filter"
    assert blocked.model_extra["guard"]["stage"] == "prefill" and blocked.model_extra["guard"]["decision"] == "block"
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": blocked_prompt}],
                                            max_tokens=32, stream=True)
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "content_filter"
    answered = client.chat.completions.create(model="m", messages=[{"role": "user", "content": answered_prompt}],
                                              max_tokens=32, temperature=0)
    assert answered.choices[0].finish_reason != "content_filter" and answered.choices[0].message.content


UNSUPPORTED = {
    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    "tool_choice": "required",
    "functions": [{"name": "lookup"}],
    "function_call": "auto",
    "parallel_tool_calls": True,
    "response_format": {"type": "json_object"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "low",
    "verbosity": "low",
    "store": True,
}


def test_each_unsupported_parameter_is_a_400_naming_it(served: dict, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": served["harmless"][0]}]
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    for field, value in [*UNSUPPORTED.items(), ("response_format", schema)]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=messages, max_tokens=4, **{field: value})
        assert err.value.status_code == 400 and err.value.param == field, field
        assert err.value.code == "unsupported_parameter", field
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt="Once", echo=True)
    assert err.value.param == "echo" and err.value.code == "unsupported_parameter"


def test_logprobs_penalties_and_two_choices_plain_and_streaming(served: dict, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": served["harmless"][0]}]
    greedy = {"model": "m", "messages": messages, "max_tokens": 12, "temperature": 0, "frequency_penalty": 1.5,
              "presence_penalty": 0.5, "logprobs": True, "top_logprobs": 2}
    plain = client.chat.completions.create(**greedy)
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens > 0 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    assert plain.system_fingerprint.startswith("fp_")
    chunks = list(client.chat.completions.create(**greedy, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert {c.system_fingerprint for c in chunks} == {plain.system_fingerprint}

    sampled = {"model": "m", "messages": messages, "max_tokens": 12, "temperature": 0.8, "seed": 11, "n": 2}
    two = client.chat.completions.create(**sampled)
    assert [c.index for c in two.choices] == [0, 1] and all(c.model_extra["guard"] for c in two.choices)
    texts = ["", ""]
    for chunk in client.chat.completions.create(**sampled, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in two.choices]
    second = client.chat.completions.create(**{**sampled, "n": 1, "seed": 12})
    assert second.choices[0].message.content == two.choices[1].message.content  # choice i samples with seed + i


def test_legacy_completions_plain_and_streaming(served: dict, client: openai.OpenAI) -> None:
    prompt = served["harmless"][0]
    plain = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and choice.finish_reason in ("stop", "length", "content_filter")
    assert len(choice.logprobs.tokens) == plain.usage.completion_tokens and plain.model_extra["guard"]["stage"]
    chunks = list(client.completions.create(model="m", prompt=[prompt, prompt], max_tokens=12, temperature=0, stream=True))
    texts = ["", ""]
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [choice.text] * 2 or choice.finish_reason == "content_filter"


def test_models_and_moderation_categories_for_typed_clients(served: dict, client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"
    result = client.moderations.create(input=served["harmful"][0]).results[0]
    assert result.categories.violence is False and result.category_scores.violence == 0.0
    assert result.categories.self_harm_intent is False and result.category_applied_input_types.hate == []
    assert result.categories.model_extra["harmful"] == result.flagged


def test_every_log_line_is_json(served: dict) -> None:
    """No progress bar or library warning breaks the one-object-per-line log stream."""
    lines = [line for line in served["log"].read_text().splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines)


def test_wrong_api_key_is_rejected(served: dict) -> None:
    bad = openai.OpenAI(base_url=f"{served['base']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    assert KEY not in served["log"].read_text() and "wrong" not in served["log"].read_text()


def test_disconnected_stream_stops_its_generation(served: dict) -> None:
    base = served["base"]
    before = metric(base, "neuronguard_generation_tokens_total")
    budget = 200
    body = {"messages": [{"role": "user", "content": served["harmless"][0]}], "max_tokens": budget, "stream": True,
            "guard": {"mode": "block+patch"}}  # patching doubles the step cost, so the stream outlives the disconnect
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    wait_until(lambda: metric(base, "neuronguard_running_requests") == 0, 30, "the cancelled job to end")
    generated = metric(base, "neuronguard_generation_tokens_total") - before
    assert generated < budget // 2, generated
    ok = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert ok.status_code == 200


def test_prometheus_scrapes_the_server(served: dict, tmp_path: Path) -> None:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        pytest.skip("prometheus not installed (scripts/install_system_deps.sh)")
    target = urllib.parse.urlparse(served["base"]).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "neuronguard", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def query(expr: str) -> float | None:
        result = httpx.get(api, params={"query": expr}, timeout=5).json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200,
                   60, "prometheus", proc, log)
        wait_until(lambda: query('up{job="neuronguard"}') == 1, 60, "the first scrape", proc, log)
        assert query("neuronguard_ready") == 1
        assert query('sum(neuronguard_requests_total{endpoint="/v1/chat/completions",status="200"})') >= 1
        assert query('sum(neuronguard_guard_decisions_total{stage="prefill",decision="block"})') >= 1
        assert query("sum(neuronguard_time_to_first_token_seconds_count)") >= 1
        assert query("count(neuronguard_model_info)") == 1
    finally:
        stop(proc)


def test_sigterm_drains_an_in_flight_stream(served: dict) -> None:
    """Runs last: uvicorn's graceful shutdown lets a running stream finish with [DONE]."""
    base, proc = served["base"], served["proc"]
    body = {"messages": [{"role": "user", "content": served["harmless"][0]}], "max_tokens": 64, "stream": True,
            "temperature": 0, "guard": {"mode": "block+patch"}}
    received: list[str] = []
    started = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            for line in response.iter_lines():
                if line:
                    received.append(line)
                    started.set()

    reader = threading.Thread(target=read)
    reader.start()
    # The first chunk arrives while the job runs; polling a gauge could miss a short generation.
    assert started.wait(60), "the stream did not start"
    proc.send_signal(signal.SIGTERM)
    reader.join(60)
    assert not reader.is_alive() and received[-1] == "data: [DONE]"
    assert proc.wait(60) == 0  # drained, then a clean exit
