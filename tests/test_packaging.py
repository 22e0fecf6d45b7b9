"""The distribution installs one namespace, `neuronguard`, and ships every folder of the tree.

The top-level folders map to `neuronguard.models`, `neuronguard.detector` and
`neuronguard.server`, so a user's own `models` or `server` package is never shadowed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"neuronguard": "neuronguard", "models": "neuronguard.models", "detector": "neuronguard.detector",
          "server": "neuronguard.server"}


def tracked_folders() -> set[str]:
    """Every folder holding tracked files under the mapped top-level folders, as a package name."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *MAPPED], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    names = set()
    for file in files:
        parts = Path(file).parent.parts
        names.add(".".join([MAPPED[parts[0]], *parts[1:]]))
    return names


def test_package_list_covers_every_folder_of_the_tree() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == tracked_folders()
    assert config["package-dir"] == {v: k for k, v in MAPPED.items()}


@pytest.mark.slow
def test_installed_tree_imports_as_neuronguard_only(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "neuronguard"]
    assert (target / "neuronguard/models/organism/bundle/bundle.json").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import neuronguard.server.app, neuronguard.detector.build, neuronguard.models.organism as o;"
             "print(o.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    for bare in ("models", "server", "detector"):
        result = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode != 0 and "No module named" in result.stderr, bare
