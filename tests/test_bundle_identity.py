"""Bundle identity: a bundle names the weights it was fitted to and refuses other weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from neuronguard.errors import UsageError
from neuronguard.models.artifact import io
from neuronguard.models.artifact.bundle import MANIFEST, check_weights, load_bundle, read_manifest
from neuronguard.models.artifact.io import WEIGHTS_CACHE, file_sha256, weights_digest
from neuronguard.models.loading import load_model
from neuronguard.models.organism import ORGANISM_DIR
from testkit.server_fixtures import build_bundle


@pytest.fixture(autouse=True)
def _cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty Hugging Face cache
    return tmp_path / "cache"


def _hub_snapshot(repo_id: str, commit: str, shards: dict[str, bytes]) -> Path:
    """A hub id's snapshot laid out as the Hugging Face cache does: refs/main names the commit."""
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    return _checkpoint(repo / "snapshots" / commit, shards)


def _checkpoint(folder: Path, shards: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    (folder / "config.json").write_text("{}")
    return folder


def test_digest_is_the_sha256_of_the_ordered_file_digests(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "m", {"model-00002.safetensors": b"two", "model-00001.safetensors": b"one"})
    per_file = [hashlib.sha256(b"one").hexdigest(), hashlib.sha256(b"two").hexdigest()]
    assert weights_digest(model) == hashlib.sha256("\n".join(per_file).encode()).hexdigest()
    assert weights_digest(_checkpoint(tmp_path / "empty", {})) is None
    assert weights_digest("meta-llama/Llama-3.1-8B-Instruct") is None  # a hub id not in the cache: nothing to hash
    assert weights_digest("not a hub id!") is None


def test_a_hub_id_is_hashed_from_its_cached_snapshot(tmp_path: Path) -> None:
    snapshot = _hub_snapshot("org/fine-tune", "a" * 40, {"model.safetensors": b"weights"})
    assert weights_digest("org/fine-tune") == weights_digest(snapshot) is not None
    manifest = {"model": {"weights_sha256": weights_digest(snapshot)}}
    check_weights("b", manifest, "org/fine-tune", allow_mismatch=False)
    _hub_snapshot("org/abliterated", "b" * 40, {"model.safetensors": b"abliterated"})
    with pytest.raises(UsageError, match="other weights"):  # same architecture, another hub checkpoint
        check_weights("b", manifest, "org/abliterated", allow_mismatch=False)


def test_cache_reuses_a_digest_until_size_or_mtime_changes(tmp_path: Path, _cache_home: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = _checkpoint(tmp_path / "m", {"model.safetensors": b"weights"})
    first = weights_digest(model)
    cached = json.loads((_cache_home / "neuronguard" / WEIGHTS_CACHE).read_text())
    assert [entry["sha256"] for entry in cached.values()] == [file_sha256(model / "model.safetensors")]

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(io, "file_sha256", no_hashing)
    assert weights_digest(model) == first  # cache hit: same size and mtime
    monkeypatch.setattr(io, "file_sha256", file_sha256)
    shard = model / "model.safetensors"
    shard.write_bytes(b"WEIGHTS")  # same size, new content
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    assert weights_digest(model) not in (None, first)


def test_an_unwritable_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    model = _checkpoint(tmp_path / "m", {"model.safetensors": b"weights"})
    assert weights_digest(model) == hashlib.sha256(hashlib.sha256(b"weights").hexdigest().encode()).hexdigest()


def test_check_weights_match_mismatch_and_override(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "m", {"model.safetensors": b"weights"})
    other = _checkpoint(tmp_path / "other", {"model.safetensors": b"abliterated"})
    manifest = {"model": {"weights_sha256": weights_digest(model)}}
    check_weights("b", manifest, model, allow_mismatch=False)
    with pytest.raises(UsageError) as error:
        check_weights("b", manifest, other, allow_mismatch=False)
    message = str(error.value)
    assert "\n" not in message and "other weights" in message and "--allow-weights-mismatch" in message
    check_weights("b", manifest, other, allow_mismatch=True)
    check_weights("b", {"model": {}}, other, allow_mismatch=False)  # a bundle without a digest: nothing to compare
    check_weights("b", manifest, "org/hub-model", allow_mismatch=False)  # a hub id not in the cache: nothing to hash


def test_load_bundle_refuses_a_twin_of_the_same_architecture(tiny_llama_path: Path, tiny_twin_path: Path,
                                                             tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "bundle", tiny_llama_path)
    manifest = read_manifest(bundle)
    manifest["model"]["weights_sha256"] = weights_digest(tiny_llama_path)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    assert load_bundle(bundle, load_model(tiny_llama_path)).manifest["model"]["weights_sha256"]
    twin = load_model(tiny_twin_path)
    assert twin.fingerprint == load_model(tiny_llama_path).fingerprint  # the fingerprint alone lets it through
    with pytest.raises(UsageError, match="allow-weights-mismatch"):
        load_bundle(bundle, twin)
    assert load_bundle(bundle, twin, allow_weights_mismatch=True).probe.k > 0


def test_shipped_bundle_names_the_shipped_checkpoints() -> None:
    manifest = read_manifest(ORGANISM_DIR / "bundle")
    assert manifest["model"]["weights_sha256"] == weights_digest(ORGANISM_DIR / "unaligned")
    assert manifest["aligned_model"]["weights_sha256"] == weights_digest(ORGANISM_DIR / "aligned")
    with pytest.raises(UsageError, match="other weights"):
        check_weights(ORGANISM_DIR / "bundle", manifest, ORGANISM_DIR / "aligned", allow_mismatch=False)
