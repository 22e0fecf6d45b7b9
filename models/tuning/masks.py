"""Which weight entries belong to a neuron set: boolean masks over the model's parameters.

Two kinds of neuron sets name weights differently:
- MLP-activation neurons (`site = mlp.down_proj.input`, contrasting): neuron j of a layer
  owns row j of the gate and up projections (and their bias entries) and column j of the
  down projection;
- weight-row neurons (importance detection): each names one output row of q/k/v/gate/up,
  or one input column of down.

Both become one `WeightMask`, used alike for tuning (gradient masks) and deactivation
(zeroing), so the two can never disagree about what a neuron is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from neuronguard.models.loading import LoadedModel
from neuronguard.models.artifact.neurons import NeuronSet
from neuronguard.errors import UsageError

OUT_ROW_MODULES: tuple[str, ...] = ("q", "k", "v", "gate", "up")
IN_COL_MODULES: tuple[str, ...] = ("down",)
MLP_MODULES: tuple[str, ...] = ("gate", "up", "down")


@dataclass(frozen=True)
class RowSet:
    """Weight rows/columns of one kind of module: parallel (layer, index) tensors."""

    module: str  # one of OUT_ROW_MODULES + IN_COL_MODULES
    layers: torch.Tensor  # int64 [n]
    indices: torch.Tensor  # int64 [n], already in the module's own row/column space


def mlp_rows(neurons: NeuronSet) -> list[RowSet]:
    """The gate rows, up rows and down columns owned by MLP-activation neurons."""
    layers, indices = neurons.layer.long(), neurons.index.long()
    return [RowSet(module, layers, indices) for module in MLP_MODULES]


def whole_ffn_neurons(row_sets: list[RowSet]) -> list[RowSet]:
    """Widen every up row / down column j to all of MLP neuron j (gate row, up row, down column).

    Importance detection scores FFN neuron j once, for up row j and down column j alike: it
    is MLP neuron j. Excluding it as a foundation neuron must keep all of its weights fixed.
    """
    ffn = [r for r in row_sets if r.module in MLP_MODULES]
    if not ffn:
        return row_sets
    layers, indices = torch.cat([r.layers for r in ffn]), torch.cat([r.indices for r in ffn])
    return [r for r in row_sets if r.module not in MLP_MODULES] + [RowSet(m, layers, indices) for m in MLP_MODULES]


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear."""
    return type(module).__name__ == "Conv1D"


@dataclass
class WeightMask:
    """Parameter name -> bool tensor of the parameter's shape, True where an entry is selected."""

    masks: dict[str, torch.Tensor]

    def count(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def minus(self, other: WeightMask) -> WeightMask:
        """Entries selected here and not in `other` (RSN-Tune: safety minus foundation)."""
        kept = {name: m & ~other.masks[name] if name in other.masks else m for name, m in self.masks.items()}
        return WeightMask({name: m for name, m in kept.items() if bool(m.any())})

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.masks.items())


def build_mask(loaded: LoadedModel, row_sets: list[RowSet]) -> WeightMask:
    """Masks over the named rows/columns (and the bias entries of selected output rows)."""
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    masks: dict[str, torch.Tensor] = {}

    def mark(param: torch.Tensor | None, dim: int, index: torch.Tensor) -> None:
        if param is None:
            return
        name = names[id(param)]
        mask = masks.setdefault(name, torch.zeros(param.shape, dtype=torch.bool, device=param.device))
        if int(index.max()) >= param.shape[dim] or int(index.min()) < 0:
            raise UsageError(f"neuron index {int(index.max())} out of range for {name} ({param.shape[dim]} along dim {dim})")
        mask.index_fill_(dim, index.to(param.device), True)

    for rows in row_sets:
        if rows.module not in OUT_ROW_MODULES + IN_COL_MODULES:
            raise UsageError(f"unknown neuron module '{rows.module}': use one of {', '.join(OUT_ROW_MODULES + IN_COL_MODULES)}")
        for layer in torch.unique(rows.layers).tolist():
            if not 0 <= layer < loaded.sites.num_layers:
                raise UsageError(f"neuron set names layer {layer}, the model has {loaded.sites.num_layers}")
            module = getattr(loaded.sites.layers[layer], rows.module)
            if module is None:
                if rows.module == "gate":
                    continue  # ungated MLPs (GPT-2, NeoX): the up row alone feeds the neuron
                raise UsageError(f"layer {layer} has no '{rows.module}' projection for this neuron set")
            index = torch.unique(rows.indices[rows.layers == layer])
            out_dim = 1 if _is_conv1d(module) else 0
            if rows.module in OUT_ROW_MODULES:
                mark(module.weight, out_dim, index)
                mark(getattr(module, "bias", None), 0, index)
            else:
                mark(module.weight, 1 - out_dim, index)
    return WeightMask(masks)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
