"""What the lifespan loads: the served model, its guard bundle and the patch source.

`preflight` runs every check that loads no weights (guard settings, device, the model and
patch source resolvable and of one architecture, the bundle made for the model and its
weights) before the
port is bound, so a mistake stops start-up with one line and its fix; `load_runtime` does
the slow loading inside the app's lifespan. Without a bundle (`--guard-mode off`) the
model is served unguarded.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hub_constants
from transformers import AutoConfig

from neuronguard.errors import UsageError
from neuronguard.models.artifact.bundle import Bundle, check_fingerprint, check_weights, load_bundle, read_manifest
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.artifact.probe import Probe, probes_readout
from neuronguard.models.generation import PatchSource, stop_ids
from neuronguard.models.loading import (
    LoadedModel,
    assert_same_architecture,
    config_fingerprint,
    load_model,
    resolve_device,
    resolve_dtype,
)
from neuronguard.models.readout import LinearReadout
from neuronguard.server.guard import GuardMode, GuardPolicy
from neuronguard.server.settings import DEFAULT_MODEL, Settings

log = logging.getLogger("neuronguard.server")
PREFILL_HEAD, STREAM_HEAD = 0, 1  # heads of `Runtime.readout`, in the order `load_runtime` builds it
ORGANISM_NAME = "neuronguard-organism"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_PATCH_MODES: tuple[GuardMode, ...] = ("patch", "block+patch")


@dataclass(frozen=True)
class ServedNames:
    """The ids the model answers to; the first names it in responses (vLLM's `--served-model-name`)."""

    ids: tuple[str, ...]
    checked: bool  # names were configured, so a request's `model` must be one of them

    def accepts(self, model: str | None) -> bool:
        return not self.checked or model is None or model in self.ids


@dataclass
class Runtime:
    loaded: LoadedModel
    bundle: Bundle | None  # None: served unguarded (`--guard-mode off` without a bundle)
    patch_source: PatchSource | None
    probe_selection: NeuronSelection | None  # the neurons both probes read, in bundle order
    readout: LinearReadout | None  # both probes' logits on probe_selection (PREFILL_HEAD, STREAM_HEAD)
    stop_token_ids: frozenset[int]
    names: ServedNames
    system_fingerprint: str  # OpenAI's field: changes when the model architecture or the guard's neurons do

    @property
    def served_name(self) -> str:
        return self.names.ids[0]

    @property
    def prefill_probe(self) -> Probe:
        assert self.bundle is not None, "a scoring policy needs a bundle (policy_for refuses one without)"
        return self.bundle.probe

    @property
    def stream_probe(self) -> Probe:
        prefill = self.prefill_probe
        return self.bundle.stream_probe or prefill if self.bundle is not None else prefill

    def policy(self, mode: GuardMode) -> GuardPolicy:
        """The server's guard: its mode from settings, thresholds from the bundle's probes."""
        if self.bundle is None:
            return GuardPolicy(mode, 1.0, 1.0)  # mode is "off": check_guard_settings allows nothing else
        return GuardPolicy(mode, self.bundle.probe.threshold, self.stream_probe.threshold)

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head: the token ids `logit_bias` may name."""
        return int(self.loaded.model.get_output_embeddings().weight.shape[0])


def served_names(settings: Settings) -> ServedNames:
    if settings.served_model_name:
        return ServedNames(tuple(dict.fromkeys(settings.served_model_name)), checked=True)
    path = Path(settings.model).expanduser()
    if path.is_dir():
        return ServedNames((ORGANISM_NAME if path.resolve() == Path(DEFAULT_MODEL).resolve() else path.name,), False)
    return ServedNames((settings.model,), False)


def system_fingerprint(model_fingerprint: str, bundle: Bundle | None) -> str:
    neurons = bundle.probe.neurons_sha256 if bundle is not None else "unguarded"
    return "fp_" + hashlib.sha256(f"{model_fingerprint}:{neurons}".encode()).hexdigest()[:16]


def check_guard_settings(settings: Settings) -> None:
    """The guard mode needs what it uses: a bundle to score, a patch source to patch; sharding needs the batched engine."""
    if settings.tensor_parallel_size > 1 and settings.engine != "batched":
        raise UsageError(f"--tensor-parallel-size {settings.tensor_parallel_size} runs on the batching engine "
                         "(fix: add --engine batched)")
    if settings.bundle is None and settings.guard_mode != "off":
        raise UsageError(f"guard mode '{settings.guard_mode}' needs a guard bundle "
                         "(fix: pass --bundle DIR, or --guard-mode off to serve the model unguarded)")
    if settings.guard_mode in _PATCH_MODES and settings.patch_source is None:
        raise UsageError(f"guard mode '{settings.guard_mode}' needs a patch source "
                         "(fix: pass --patch-source PATH_OR_ID, or choose --guard-mode block)")


def _config_fingerprint(label: str, source: str, flag: str) -> str:
    """Architecture fingerprint of a checkpoint directory or Hub id, from its config alone."""
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UsageError(f"{label} '{source}' has no config.json (fix: point {flag} at a Hugging Face checkpoint directory)")
    if not local.exists() and not _HUB_ID.match(source):
        raise UsageError(f"{label} '{source}' does not exist (fix: give {flag} a checkpoint directory or a Hub id such as org/name)")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if hub_constants.HF_HUB_OFFLINE:
            where, fix = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)", "download it into the cache first"
        else:
            where, fix = "on the Hugging Face Hub", "check the id and your access to it"
        raise UsageError(f"{label} '{source}' is neither a checkpoint directory nor a model {where}: {reason} "
                         f"(fix: give {flag} a local checkpoint directory, or {fix})") from None
    return config_fingerprint(config)


def preflight(settings: Settings) -> None:
    """Fail fast, before binding a port: each mistake is one line that says how to fix it."""
    check_guard_settings(settings)
    resolve_dtype(settings.dtype)
    resolve_device(settings.device)
    model_fingerprint = _config_fingerprint("model", settings.model, "--model")
    if settings.bundle is None:
        return
    manifest = read_manifest(settings.bundle)
    check_fingerprint(settings.bundle, manifest, model_fingerprint, settings.model)
    check_weights(settings.bundle, manifest, settings.model, settings.allow_weights_mismatch)
    if settings.patch_source is not None:
        source_fingerprint = _config_fingerprint("patch source", settings.patch_source, "--patch-source")
        if source_fingerprint != model_fingerprint:
            raise UsageError(
                f"patch source '{settings.patch_source}' and model '{settings.model}' have different architectures "
                f"(config fingerprints {source_fingerprint[:12]} vs {model_fingerprint[:12]}) (fix: give --patch-source "
                "the aligned twin of the served model's base model, or --patch-source none to serve without live patching)"
            )


def load_runtime(settings: Settings) -> Runtime:
    """Load model, bundle and patch source; raise `UsageError` with a clear message on a mismatch."""
    check_guard_settings(settings)
    sharded = settings.tensor_parallel_size > 1
    loaded = load_model(settings.model, settings.device, settings.dtype, tensor_parallel=sharded)
    bundle = None
    if settings.bundle is not None:
        bundle = load_bundle(settings.bundle, loaded, allow_weights_mismatch=settings.allow_weights_mismatch)
    probe_selection = readout = patch_source = None
    if bundle is None:
        log.warning("serving without a guard: no bundle and guard mode 'off'; requests cannot ask for one")
        if settings.patch_source is not None:
            log.warning("patch source not loaded: live patching needs a bundle's neurons")
    else:
        stream_probe = bundle.stream_probe or bundle.probe
        probe_selection = bundle.neurons.top(max(bundle.probe.k, stream_probe.k)).selection()
        readout = probes_readout(probe_selection, (bundle.probe, stream_probe))
        if settings.patch_source is not None:
            source = load_model(settings.patch_source, settings.device, settings.dtype, tensor_parallel=sharded)
            assert_same_architecture(loaded, source)
            k = settings.patch_k or bundle.default_patch_k
            if k > len(bundle.neurons):
                raise UsageError(f"patch k={k} exceeds the bundle's {len(bundle.neurons)} neurons "
                                 "(fix: lower --patch-k / NEURONGUARD_PATCH_K)")
            # The deepest layer's selected-neuron path slices whole weight rows: not on a sharded twin.
            patch_source = PatchSource(source.model, bundle.neurons.top(k).selection(), source.sites, selected_mlp=not sharded)
    log.info(
        "loaded",
        extra={"model": settings.model, "bundle": bundle.name if bundle else None,
               "patch_source": settings.patch_source if patch_source else None,
               "guard_mode": settings.guard_mode, "device": str(loaded.device)},
    )
    return Runtime(loaded, bundle, patch_source, probe_selection, readout, stop_ids(loaded.tokenizer, loaded.model),
                   served_names(settings), system_fingerprint(loaded.fingerprint, bundle))
