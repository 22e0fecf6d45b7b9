"""Shared fixtures: tiny random checkpoints on disk, loaded through the product's loader."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="neuronguard-test-cache-")  # weights-digest cache stays out of ~
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

from testkit.tiny_models import build_tiny, scaled_twin

from neuronguard.models.loading import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_twin_path(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scaled_twin(tiny_llama_path, tmp_path_factory.mktemp("tiny-llama-twin"))


@pytest.fixture()
def tiny_llama(tiny_llama_path: Path) -> LoadedModel:
    return load_model(tiny_llama_path)


@pytest.fixture()
def tiny_twin(tiny_twin_path: Path) -> LoadedModel:
    return load_model(tiny_twin_path)
