"""Guard bundles: everything the server needs to guard one model, checked on load.

Layout of a bundle directory:
  bundle.json           manifest (model fingerprint and weights digest, method, data, metrics, versions)
  neurons.safetensors   ranked safety neurons (`models.artifact.neurons.NeuronSet`)
  probe.json            prefill probe (last prompt token)
  stream_probe.json     optional probe on generated positions, to stop mid-stream
  report/               report.json and PNG plots
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronguard.models.artifact.probe import Probe
from neuronguard.models.loading import LoadedModel
from neuronguard.models.artifact.neurons import NeuronSet
from neuronguard.models.artifact.io import file_sha256, weights_digest
from neuronguard.errors import UsageError

FORMAT = "neuronguard.bundle/1"
MANIFEST = "bundle.json"
NEURONS = "neurons.safetensors"
PROBE = "probe.json"
STREAM_PROBE = "stream_probe.json"


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    neurons: NeuronSet
    probe: Probe
    stream_probe: Probe | None

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.name)

    @property
    def default_patch_k(self) -> int:
        return int(self.manifest.get("patch_k") or self.probe.k)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The bundle's `bundle.json`, checked for format; cheap (no tensors are read)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UsageError(f"'{path}' is not a guard bundle (no {MANIFEST}): build one with `neuronguard bundle build` or pass --bundle DIR")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"'{manifest_path}' is not valid JSON: rebuild the bundle") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("model", {}), dict):
        raise UsageError(f"'{manifest_path}' is not a {FORMAT} manifest: rebuild the bundle")
    return manifest


def check_fingerprint(path: str | Path, manifest: dict[str, Any], fingerprint: str, model_name: str) -> None:
    """Refuse a bundle built for another architecture (the manifest's `model.config_sha256`)."""
    expected = manifest.get("model", {}).get("config_sha256")
    if expected and expected != fingerprint:
        raise UsageError(
            f"bundle '{path}' was built for another model (fingerprint {expected[:12]}, model '{model_name}' "
            f"has {fingerprint[:12]}) (fix: build a bundle for this model with `neuronguard bundle build`, or pass its own --bundle)"
        )


def check_weights(path: str | Path, manifest: dict[str, Any], model_dir: str | Path, allow_mismatch: bool) -> None:
    """Refuse a bundle fitted to other weights (the manifest's `model.weights_sha256`).

    A fine-tune of the same architecture (another checkpoint, an abliterated copy) passes the
    fingerprint check, but its safety neurons and probe thresholds were never fitted to it.
    Nothing is checked where either digest is missing (older bundles, hub ids) or when
    `allow_mismatch` is set.
    """
    expected = manifest.get("model", {}).get("weights_sha256")
    if not expected or allow_mismatch:
        return
    actual = weights_digest(model_dir)
    if actual is not None and actual != expected:
        raise UsageError(
            f"bundle '{path}' was built for other weights (weights_sha256 {expected[:12]}, model '{model_dir}' has "
            f"{actual[:12]}) (fix: rebuild the bundle for these weights, or pass --allow-weights-mismatch)"
        )


def load_bundle(path: str | Path, model: LoadedModel | None = None, allow_weights_mismatch: bool = False) -> Bundle:
    """Load and validate a bundle; with `model`, refuse one made for another architecture or other weights."""
    path = Path(path)
    manifest = read_manifest(path)
    neurons = NeuronSet.load(path / NEURONS, model)
    digest = file_sha256(path / NEURONS)
    probes: list[Probe] = []
    for name in (PROBE, STREAM_PROBE):
        if name == STREAM_PROBE and not (path / name).exists():
            continue
        probe = Probe.load(path / name)
        if probe.neurons_sha256 != digest:
            raise UsageError(f"{name} in '{path}' was trained on another neuron file (sha256 mismatch): rebuild the bundle")
        if probe.k > len(neurons):
            raise UsageError(f"{name} in '{path}' uses k={probe.k} neurons, the neuron file has {len(neurons)}")
        probes.append(probe)
    if model is not None:
        check_fingerprint(path, manifest, model.fingerprint, model.name)
        check_weights(path, manifest, model.name, allow_weights_mismatch)
    return Bundle(path, manifest, neurons, probes[0], probes[1] if len(probes) > 1 else None)
