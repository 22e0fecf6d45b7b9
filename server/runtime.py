"""What the lifespan loads: the served model, its guard bundle and the patch source.

`preflight` runs the cheap checks (paths, bundle fingerprint against the model config)
before the HTTP server starts, so a mismatched bundle stops start-up with one clear line;
`load_runtime` does the slow loading inside the app's lifespan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from neuronguard.models.artifact.bundle import Bundle, check_fingerprint, load_bundle, read_manifest
from neuronguard.models.artifact.probe import Probe, probes_readout
from neuronguard.models.generation import PatchSource, stop_ids
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.readout import LinearReadout
from neuronguard.models.loading import LoadedModel, assert_same_architecture, config_fingerprint, load_model
from neuronguard.errors import UsageError
from neuronguard.server.guard import GuardMode, GuardPolicy
from neuronguard.server.settings import Settings

log = logging.getLogger("neuronguard.server")
PREFILL_HEAD, STREAM_HEAD = 0, 1  # heads of `Runtime.readout`, in the order `load_runtime` builds it


@dataclass
class Runtime:
    loaded: LoadedModel
    bundle: Bundle
    patch_source: PatchSource | None
    probe_selection: NeuronSelection  # the neurons both probes read, in bundle order
    readout: LinearReadout  # both probes' logits on probe_selection (PREFILL_HEAD, STREAM_HEAD)
    stop_token_ids: frozenset[int]
    served_name: str

    @property
    def stream_probe(self) -> Probe:
        return self.bundle.stream_probe or self.bundle.probe

    def policy(self, mode: GuardMode) -> GuardPolicy:
        """The server's guard: its mode from settings, thresholds from the bundle's probes."""
        return GuardPolicy(mode, self.bundle.probe.threshold, self.stream_probe.threshold)

    @property
    def context_length(self) -> int:
        return self.loaded.context_length


def served_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    path = Path(settings.model).expanduser()
    if path.is_dir():
        return "neuronguard-organism" if path.resolve() == Path(Settings().model).resolve() else path.name
    return settings.model


def preflight(settings: Settings) -> None:
    """Fail fast, before binding a port, on a missing bundle or one made for another model."""
    if settings.guard_mode in ("patch", "block+patch") and settings.patch_source is None:
        raise UsageError(f"guard mode '{settings.guard_mode}' needs a patch source: set --patch-source")
    manifest = read_manifest(settings.bundle)
    for label, source in (("model", settings.model), ("patch source", settings.patch_source)):
        if source is not None and Path(source).expanduser().exists() and not (Path(source).expanduser() / "config.json").is_file():
            raise UsageError(f"{label} '{source}' has no config.json: point at a Hugging Face checkpoint directory")
    try:
        actual = config_fingerprint(AutoConfig.from_pretrained(settings.model))
    except (OSError, ValueError, AttributeError):
        return  # load_runtime reports these with the loader's own messages
    check_fingerprint(settings.bundle, manifest, actual, settings.model)


def load_runtime(settings: Settings) -> Runtime:
    """Load model, bundle and patch source; raise `UsageError` with a clear message on a mismatch."""
    loaded = load_model(settings.model, settings.device, settings.dtype)
    bundle = load_bundle(settings.bundle, loaded)
    stream_probe = bundle.stream_probe or bundle.probe
    probe_selection = bundle.neurons.top(max(bundle.probe.k, stream_probe.k)).selection()
    patch_source = None
    if settings.patch_source is not None:
        source = load_model(settings.patch_source, settings.device, settings.dtype)
        assert_same_architecture(loaded, source)
        k = settings.patch_k or bundle.default_patch_k
        if k > len(bundle.neurons):
            raise UsageError(f"patch k={k} exceeds the bundle's {len(bundle.neurons)} neurons: lower NEURONGUARD_PATCH_K")
        patch_source = PatchSource(source.model, bundle.neurons.top(k).selection(), source.sites)
    elif settings.guard_mode in ("patch", "block+patch"):
        raise UsageError(f"guard mode '{settings.guard_mode}' needs a patch source: set --patch-source")
    log.info(
        "loaded",
        extra={"model": settings.model, "bundle": bundle.name, "patch_source": settings.patch_source,
               "guard_mode": settings.guard_mode, "device": str(loaded.device)},
    )
    return Runtime(loaded, bundle, patch_source, probe_selection, probes_readout(probe_selection, (bundle.probe, stream_probe)),
                   stop_ids(loaded.tokenizer, loaded.model), served_name(settings))
