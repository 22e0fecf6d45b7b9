"""Load any HF causal LM with its tokenizer, offline-first, with an architecture fingerprint.

Plain transformers only: no patched library files, and `trust_remote_code` stays off unless
the caller asks for it. The fingerprint ties neuron sets, probes and bundles to the model
architecture they were computed for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from neuronguard.models.sites import NeuronSites, SiteOverride, resolve_sites
from neuronguard.errors import UsageError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Config keys that describe runtime or serialisation, not the architecture.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "architectures",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "_commit_hash",
        "id2label",
        "label2id",
    }
)


def config_fingerprint(config: Any) -> str:
    """sha256 of the architecture-defining part of a transformers config."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {k: v for k, v in sorted(data.items()) if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class LoadedModel:
    """A model ready for guarded inference: weights, tokenizer, neuron sites, identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    sites: NeuronSites
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return int(getattr(self.tokenizer, "model_max_length", 2048))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}': use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device '{device}' requested but CUDA is not available: use --device cpu")
    return torch.device(device)


def load_model(
    path_or_id: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
    *,
    trust_remote_code: bool = False,
    site_override: SiteOverride | None = None,
    tensor_parallel: bool = False,
) -> LoadedModel:
    """Load a causal LM and tokenizer from a local directory or a hub id (cache only offline).

    `tensor_parallel` shards it with transformers' plan for its architecture over the ranks of
    the running `torchrun` group; each rank then holds its slice on its own device.
    """
    source = str(path_or_id)
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UsageError(f"'{source}' exists but has no config.json: point at a Hugging Face checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        torch_dtype = resolve_dtype(dtype)
        if torch_dtype == "auto" and resolve_device(device).type == "cpu":
            torch_dtype = torch.float32  # half precision matmuls are slow or missing on CPU
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            **({"tp_plan": "auto"} if tensor_parallel else {}),
        )
    except (OSError, ValueError) as exc:
        if isinstance(exc, UsageError):
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot load model '{source}': {first_line} (give a local checkpoint directory, or a hub id already in the HF cache)"
        ) from exc
    if not tensor_parallel:  # a sharded model is already on each rank's device
        model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        sites=resolve_sites(model, site_override),
        name=source,
        fingerprint=config_fingerprint(config),
    )


def assert_same_architecture(a: LoadedModel, b: LoadedModel) -> None:
    """Contrasting and patching need two models whose neurons correspond one to one."""
    if a.fingerprint != b.fingerprint:
        raise UsageError(
            f"models '{a.name}' and '{b.name}' have different architectures (config fingerprints "
            f"{a.fingerprint[:12]} vs {b.fingerprint[:12]}): use an aligned/unaligned pair of the same base model"
        )
