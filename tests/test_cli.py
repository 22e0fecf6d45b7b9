"""The command line: subcommands are listed, and bad input is one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from neuronguard.cli import COMMAND_MODULES, main


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "neuronguard.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "inspect" in out
    assert len(COMMAND_MODULES) >= 1


def test_help_answers_fast() -> None:
    """Building the parser must not pay for torch: `--help` answers in well under the 5 s bound."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neuronguard.cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 5.0


def test_no_command_module_imports_the_heavy_stack_to_parse() -> None:
    """Every subcommand's `--help` runs in a fresh interpreter without importing torch and friends."""
    script = textwrap.dedent("""
        import contextlib, io, sys
        from neuronguard.cli import build_parser

        parser = build_parser()
        commands = [[name] for name in parser._subparsers._group_actions[0].choices]
        commands += [["probe", "train"], ["bundle", "build"], ["organism", "build"], ["organism", "data"]]
        for argv in commands:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                parser.parse_args([*argv, "--help"])
        heavy = sorted(m for m in ("torch", "transformers", "sklearn", "matplotlib", "fastapi", "uvicorn") if m in sys.modules)
        print(len(commands), ",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= len(COMMAND_MODULES)
    assert out[1:] == [], f"imported while parsing: {out[1:]}"


def test_inspect_reports_sites(tiny_llama_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--model", str(tiny_llama_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 3 and info["d_mlp"] == 64 and info["neurons"] == 192
    assert info["neuron_site"] == "model.layers.N.mlp.down_proj (input)"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "--model", "/nonexistent/model"], "cannot load model"),
        (["inspect", "--model", "{tiny}", "--layers-path", "model.layers"], "go together"),
        (["inspect", "--model", "{tiny}", "--layers-path", "model.layers", "--down-path", "mlp.w9"], "SiteOverride"),
        (["inspect", "--model", "{tiny}", "--dtype", "float8"], "unknown dtype"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    argv: list[str], message: str, tiny_llama_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.replace("{tiny}", str(tiny_llama_path)) for a in argv]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: weight-loading progress
    assert message in last_line and last_line.startswith("neuronguard inspect: error:")
