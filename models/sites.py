"""Where the neurons live: one resolver for every supported decoder architecture.

A *neuron* is one element of an MLP's intermediate activation, i.e. one input feature of the
MLP's down projection. Hooking the down projection's forward pre-hook therefore reads and
writes every neuron of a layer without touching model code. Attention projections are
resolved too, for the weight-row neurons of importance detection.

Unknown architectures are handled with a `SiteOverride` naming the dotted paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neuronguard.errors import UsageError

# Dotted paths (from the top-level CausalLM) of the list of decoder blocks, tried in order.
LAYER_LIST_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Gemma2, Phi-3, Phi
    "model.language_model.layers",  # multimodal wrappers around a decoder
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)

# Paths (relative to one block) of the module whose *input* is the MLP activation.
DOWN_PROJ_PATHS: tuple[str, ...] = (
    "mlp.down_proj",  # Llama family, Qwen2, Gemma, Phi-3
    "mlp.c_proj",  # GPT-2 (Conv1D)
    "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon, Bloom
    "mlp.fc_out",  # GPT-J
    "mlp.fc2",  # Phi
    "fc2",  # OPT
)

UP_PROJ_PATHS: tuple[str, ...] = ("mlp.up_proj", "mlp.c_fc", "mlp.dense_h_to_4h", "mlp.fc_in", "mlp.fc1", "fc1")
GATE_PROJ_PATHS: tuple[str, ...] = ("mlp.gate_proj",)
ATTN_PATHS: dict[str, tuple[str, ...]] = {
    "q": ("self_attn.q_proj",),
    "k": ("self_attn.k_proj",),
    "v": ("self_attn.v_proj",),
    "o": ("self_attn.o_proj", "self_attn.dense", "attn.c_proj", "attention.dense", "self_attn.out_proj"),
}


@dataclass(frozen=True)
class SiteOverride:
    """Explicit site paths for an architecture the resolver does not know.

    Example: `SiteOverride(layers="backbone.blocks", down="ffn.w2")`.
    """

    layers: str
    down: str
    up: str | None = None
    gate: str | None = None


@dataclass(frozen=True)
class LayerSites:
    """The hookable modules of one decoder block."""

    index: int
    down: nn.Module
    d_mlp: int
    mlp: nn.Module | None = None  # the module holding `down` (None when `down` sits in the block itself, as in OPT)
    up: nn.Module | None = None
    gate: nn.Module | None = None
    q: nn.Module | None = None
    k: nn.Module | None = None
    v: nn.Module | None = None
    o: nn.Module | None = None


@dataclass(frozen=True)
class NeuronSites:
    """All layers' sites of one model; neurons are addressed as (layer, index)."""

    layers: tuple[LayerSites, ...]
    layers_path: str
    down_path: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_mlp(self) -> int:
        return self.layers[0].d_mlp

    @property
    def num_neurons(self) -> int:
        return sum(layer.d_mlp for layer in self.layers)


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def down_input_width(module: nn.Module) -> int:
    """Number of input features of a down projection (Linear or GPT-2's transposed Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 2:
        raise UsageError(f"cannot infer the MLP width of {type(module).__name__}: it has no 2-D weight")
    # transformers' Conv1D stores weight as [in_features, out_features].
    if type(module).__name__ == "Conv1D":
        return int(weight.shape[0])
    return int(weight.shape[1])


def _first(root: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for path in paths:
        module = get_submodule(root, path)
        if module is not None:
            return path, module
    return None


def resolve_sites(model: nn.Module, override: SiteOverride | None = None) -> NeuronSites:
    """Find every layer's down projection (and attention projections when present)."""
    hint = (
        "pass SiteOverride(layers='<dotted path to the block list>', down='<path of the down "
        "projection inside a block>') (CLI: --layers-path/--down-path)"
    )
    found = (override.layers, get_submodule(model, override.layers)) if override else _first(model, LAYER_LIST_PATHS)
    if found is None or found[1] is None or not isinstance(found[1], (nn.ModuleList, nn.Sequential)):
        raise UsageError(f"cannot find the decoder blocks of {type(model).__name__}: {hint}")
    layers_path, blocks = found
    down_paths = (override.down,) if override else DOWN_PROJ_PATHS
    resolved: list[LayerSites] = []
    down_path = ""
    for i, block in enumerate(blocks):
        hit = _first(block, down_paths)
        if hit is None:
            raise UsageError(f"cannot find the MLP down projection in block {i} of {type(model).__name__}: {hint}")
        down_path, down = hit
        up_paths = (override.up,) if override and override.up else UP_PROJ_PATHS
        gate_paths = (override.gate,) if override and override.gate else GATE_PROJ_PATHS
        up = _first(block, up_paths)
        gate = _first(block, gate_paths)
        attn = {name: _first(block, paths) for name, paths in ATTN_PATHS.items()}
        parent = down_path.rpartition(".")[0]
        resolved.append(
            LayerSites(
                index=i,
                down=down,
                d_mlp=down_input_width(down),
                mlp=get_submodule(block, parent) if parent else None,
                up=up[1] if up else None,
                gate=gate[1] if gate else None,
                **{name: (hit_[1] if hit_ else None) for name, hit_ in attn.items()},
            )
        )
    if not resolved:
        raise UsageError(f"{type(model).__name__} has no decoder blocks at '{layers_path}': {hint}")
    return NeuronSites(layers=tuple(resolved), layers_path=layers_path, down_path=down_path)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
