"""`neuronguard serve` start-up: every mistake is found before the model loads and reported as one
line `neuronguard serve: error: ... (fix: ...)` with exit code 2; every setting is a flag and an
environment variable; the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuronguard.cli import main as cli_main
from neuronguard.errors import UsageError
from neuronguard.models.artifact.bundle import MANIFEST
from neuronguard.models.organism import ORGANISM_DIR
from neuronguard.server import commands
from neuronguard.server.runtime import ORGANISM_NAME, load_runtime, preflight, served_names
from neuronguard.server.settings import Settings
from testkit.server_support import bundle_path, settings  # noqa: F401 - fixtures
from testkit.tiny_models import build_tiny

ROOT = Path(__file__).resolve().parents[1]


def serve_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `neuronguard serve ARGV`, expect exit 2; return its one stderr line."""
    assert cli_main(["serve", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("neuronguard serve: error: ")
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails the test if start-up gets as far as loading weights."""
    calls: list[str] = []
    monkeypatch.setattr("neuronguard.server.runtime.load_model", lambda *a, **k: calls.append("load") or 1 / 0)
    return calls


def test_start_up_mistakes_are_one_line_with_a_fix(settings, tmp_path, capsys, no_loading) -> None:
    base = ["--model", settings.model, "--bundle", settings.bundle, "--port", "0", "--device", "cpu"]
    other = build_tiny(tmp_path / "mistral", "mistral")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # building the model printed its progress
    cases = {
        "does not exist": ["--model", "/nonexistent/checkpoint"],
        "neither a checkpoint directory nor a model in the local Hugging Face cache": ["--model", "no-such-org/no-model"],
        "has no config.json": ["--patch-source", str(tmp_path / "empty")],
        "--patch-source none": ["--patch-source", str(other)],
        "needs a guard bundle": ["--bundle", "none"],
        "needs a patch source": ["--patch-source", "none", "--guard-mode", "patch"],
        "invalid setting port": ["--port", "70000"],
        "invalid setting max_queue": ["--max-queue", "0"],
    }
    for expected, argv in cases.items():
        line = serve_error(base + argv, capsys)
        assert expected in line and "(fix: " in line, line
    assert no_loading == []


def test_patch_source_none_serves_a_model_whose_twin_does_not_match(settings, tmp_path) -> None:
    other = build_tiny(tmp_path / "mistral", "mistral")
    preflight(settings.model_copy(update={"patch_source": None}))
    assert Settings(patch_source="none").patch_source is None and Settings(bundle="None").bundle is None
    with pytest.raises(Exception, match="--patch-source none"):
        preflight(settings.model_copy(update={"patch_source": str(other)}))


def test_a_port_in_use_stops_start_up_before_anything_loads(settings, capsys, monkeypatch) -> None:
    monkeypatch.setattr("neuronguard.server.runtime.preflight", lambda _s: pytest.fail("checks ran on a taken port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = serve_error(["--model", settings.model, "--bundle", settings.bundle, "--port", str(port)], capsys)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "neuronguard.cli", "serve", "--port", str(port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        elapsed = time.perf_counter() - start
    assert f"port {port} on 127.0.0.1 is already in use" in line and "(fix: " in line
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line]  # the real CLI, same line
    assert elapsed < 30  # no model was loaded (the organism takes longer on this machine's CPUs)


def test_a_bundle_fitted_to_other_weights_needs_the_override(settings, tmp_path, capsys) -> None:
    bundle = shutil.copytree(settings.bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["model"]["weights_sha256"] = "0" * 64  # fitted to another fine-tune of the same architecture
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    argv = ["--model", settings.model, "--bundle", str(bundle), "--patch-source", "none", "--port", "0"]
    line = serve_error(argv, capsys)
    assert "other weights" in line and "--allow-weights-mismatch" in line
    other = settings.model_copy(update={"bundle": str(bundle), "patch_source": None})
    with pytest.raises(UsageError, match="other weights"):
        load_runtime(other)
    allowed = other.model_copy(update={"allow_weights_mismatch": True})
    preflight(allowed)
    assert load_runtime(allowed).bundle is not None


def test_cuda_on_a_cpu_host_is_refused_before_binding(settings, capsys, no_loading) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = serve_error(["--model", settings.model, "--bundle", settings.bundle, "--device", "cuda", "--port", "0"], capsys)
    assert "CUDA is not available" in line


def test_every_setting_is_a_flag_and_an_environment_variable(monkeypatch) -> None:
    flags = commands.SETTINGS
    assert sorted(flags) == sorted(Settings.model_fields)
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--served-model-name", "a", "--served-model-name", "b", "--refusal-message", "no",
                              "--max-tokens-default", "9", "--graceful-shutdown-s", "2.5", "--no-log-prompts",
                              "--log-level", "warning", "--bundle", "none", "--device", "cpu", "--allow-weights-mismatch"])
    given = {dest: getattr(args, dest) for dest in flags if getattr(args, dest) is not None}
    parsed = Settings(**given)
    assert parsed.served_model_name == ["a", "b"] and parsed.refusal_message == "no" and parsed.max_tokens_default == 9
    assert parsed.graceful_shutdown_s == 2.5 and parsed.log_prompts is False and parsed.log_level == "warning"
    assert parsed.bundle is None and parsed.device == "cpu" and parsed.allow_weights_mismatch
    for name, value in (("SERVED_MODEL_NAME", "x,y"), ("REFUSAL_MESSAGE", "nope"), ("MAX_TOKENS_DEFAULT", "5"),
                        ("GRACEFUL_SHUTDOWN_S", "1"), ("LOG_LEVEL", "ERROR"), ("BUNDLE", "none")):
        monkeypatch.setenv(f"NEURONGUARD_{name}", value)
    env = Settings()
    assert env.served_model_name == ["x", "y"] and env.refusal_message == "nope" and env.max_tokens_default == 5
    assert env.graceful_shutdown_s == 1 and env.log_level == "error" and env.bundle is None


def test_served_name_comes_from_the_settings_it_is_given(tmp_path, monkeypatch) -> None:
    """It read Settings() from the environment: with NEURONGUARD_MODEL set, every model was the organism."""
    model = tmp_path / "my-checkpoint"
    model.mkdir()
    monkeypatch.setenv("NEURONGUARD_MODEL", str(model))
    assert served_names(Settings(model=str(model))).ids == ("my-checkpoint",)
    assert served_names(Settings(model=str(ORGANISM_DIR / "unaligned"))).ids == (ORGANISM_NAME,)
    assert served_names(Settings(model="org/name")).ids == ("org/name",)
    named = served_names(Settings(model=str(model), served_model_name=["a", "b", "a"]))
    assert named.ids == ("a", "b") and named.checked and named.accepts("b") and not named.accepts("c")
    assert not served_names(Settings(model=str(model))).checked


def test_serve_help_is_fast_and_imports_nothing_heavy() -> None:
    probe = ("import argparse, sys; from neuronguard.server import commands; "
             "commands.register(argparse.ArgumentParser().add_subparsers()); "
             "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'pydantic') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert heavy.stdout.strip() == "[]"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "neuronguard.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert time.perf_counter() - start < 5.0
    assert "--refusal-message" in out and "NEURONGUARD_REFUSAL_MESSAGE" in out and "--no-log-prompts" in out
