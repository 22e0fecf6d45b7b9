"""Data flows one way: offline `models -> detector -> bundle`, online `bundle + models -> server`.

The model layer (loading, hooks, the guard artifact, decoding) imports neither the detector nor
the server; the detector writes artifacts through the model layer and never imports the server
or FastAPI; the server reads artifacts through the model layer and never imports the detector.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "models": {"neuronguard.detector", "neuronguard.server", "fastapi"},
    "detector": {"neuronguard.server", "fastapi"},
    "server": {"neuronguard.detector"},
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute import of a file, as `top` and `top.sub` prefixes (`neuronguard.models`, `torch`)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            names.update(".".join(parts[:n]) for n in (1, 2) if len(parts) >= n)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_layers_above_it(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_module_imports_the_old_top_level_names() -> None:
    """The packages install as neuronguard.*; a bare `models`/`server`/`detector` import would break users."""
    bare = {"models", "detector", "server"}
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & bare)
        for folder in ("models", "detector", "server", "neuronguard", "bench", "tests", "testkit")
        for path in (ROOT / folder).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_import_scan_sees_imports() -> None:
    assert {"torch", "neuronguard.models"} <= imported_modules(ROOT / "models" / "artifact" / "probe.py")
    assert "neuronguard.detector" in imported_modules(ROOT / "detector" / "build.py")
