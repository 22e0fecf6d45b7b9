"""Fixtures and helpers shared by the server API, reliability and fuzzing tests: a tiny model, its bundle, an app.

The planted probes give known harmful/harmless prompts (server_fixtures.HARMFUL/HARMLESS),
so these tests stay fast and exact; the built-in organism is exercised by bench/load_test.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from neuronguard.server.app import create_app
from neuronguard.server.runtime import Runtime, load_runtime
from neuronguard.server.settings import Settings
from testkit.server_fixtures import build_bundle


@pytest.fixture(scope="module")
def bundle_path(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle"), tiny_llama_path)


@pytest.fixture(scope="module")
def settings(tiny_llama_path: Path, tiny_twin_path: Path, bundle_path: Path) -> Settings:
    return Settings(model=str(tiny_llama_path), bundle=str(bundle_path), patch_source=str(tiny_twin_path), device="cpu")


@pytest.fixture(scope="module")
def runtime(settings: Settings) -> Runtime:
    return load_runtime(settings)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def app_for(runtime: Runtime, settings: Settings, **overrides: Any) -> FastAPI:
    return create_app(settings.model_copy(update=overrides), loader=lambda _s: runtime)


def chat(content: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, **extra}


def same_up_to_rounding(a: Any, b: Any, tol: float = 1e-5) -> bool:
    """Equal nested bodies, floats within `tol`. A packed step sums the probe readout in another order
    than a batch of one (differences ~1e-7), and rounding both sides to fixed decimals can still split
    two such scores at a rounding boundary; decisions, tokens and text must be identical."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_up_to_rounding(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_up_to_rounding(x, y, tol) for x, y in zip(a, b))
    return a == b
