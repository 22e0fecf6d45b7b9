"""The command line: subcommands are listed, and bad input is one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neuronguard.cli import COMMAND_MODULES, main


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "neuronguard.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "inspect" in out
    assert len(COMMAND_MODULES) >= 1


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
