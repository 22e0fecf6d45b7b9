"""The guard's per-token path: linear probe logits summed inside the forward pass.

Serving scores every generated token, so the probes never see gathered activations: each
hooked layer multiplies the last position's whole MLP activation with a dense
[d_mlp, heads] weight (zero rows for neurons no head reads) and adds it to a running sum.
When a step's forward ends its logits are ready; there is no gather, concatenation or
second pass. `models.hooks.capture` remains for anything that needs the activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.hooks import TokenShape, prepare_sites, registered
from neuronguard.models.sites import NeuronSites
from neuronguard.errors import UsageError


Dense = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> ([d_mlp, heads] weight, [heads] bias or zeros)


@dataclass(frozen=True, eq=False)
class LinearReadout:
    """Linear functions of the selected neurons (probe logits): `activations @ weight + bias`.

    `weight` is [k, heads] in selection order; a head that ignores a neuron has a zero there,
    so several probes over nested neuron sets share one readout. Built once per server, so
    its dense per-layer weights are cached per device and never rebuilt per request.
    """

    selection: NeuronSelection
    weight: torch.Tensor  # [k, heads]
    bias: torch.Tensor  # [heads]
    _dense: dict[tuple[torch.device, tuple[tuple[int, int], ...]], Dense] = field(
        default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.weight.shape[0] != len(self.selection) or self.bias.shape != self.weight.shape[1:]:
            raise UsageError(f"readout weight must be [k={len(self.selection)}, heads] and bias [heads]")

    def dense(self, device: torch.device, d_mlp: dict[int, int]) -> Dense:
        """layer -> float32 [d_mlp, heads] weight on `device` (zero rows for unselected neurons) and
        the bias for the first layer (zeros for the others, which add to a running sum)."""
        key = (device, tuple(sorted(d_mlp.items())))
        if key not in self._dense:
            first = min(self.selection.groups)
            dense: Dense = {}
            for layer, (order, idx) in self.selection.groups.items():
                w = torch.zeros(d_mlp[layer], self.weight.shape[1], dtype=torch.float32)
                w.index_add_(0, idx, self.weight[order].float())  # a neuron listed twice counts twice
                bias = self.bias.float() if layer == first else torch.zeros_like(self.bias, dtype=torch.float32)
                dense[layer] = (w.to(device), bias.to(device))
            self._dense[key] = dense
        return self._dense[key]


class ReadoutValues:
    """The readout at the last position of the latest forward call, summed over layers by the hooks."""

    def __init__(self, readout: LinearReadout) -> None:
        self.readout = readout
        self.layers_seen = 0
        self.total: torch.Tensor | None = None  # [b, heads]: bias plus every layer seen so far

    def clear(self) -> None:
        self.layers_seen = 0

    def _add(self, last: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, first: bool) -> None:
        """Add one layer's term; the first selected layer of a forward call starts a new sum from the bias."""
        if first:
            self.total = torch.addmm(bias, last, weight)
            self.layers_seen = 1
        else:
            assert self.total is not None
            self.total.addmm_(last, weight)
            self.layers_seen += 1

    def logits(self) -> torch.Tensor:
        """[b, heads] float32. The next forward call starts a new tensor, so this one stays valid."""
        if self.total is None or self.layers_seen != len(self.readout.selection.groups):
            raise RuntimeError("no complete forward pass ran inside this readout since the last clear()")
        return self.total


@contextmanager
def read_out(model: nn.Module, readout: LinearReadout, *, sites: NeuronSites | None = None) -> Iterator[ReadoutValues]:
    """Evaluate a linear readout of the selected neurons inside every forward call.

    The hooks sit on the down projections, registered before any `patch` a caller enters
    afterwards: at a patched layer the readout sees the model's own activations, as the
    probes were trained on them.
    """
    sites = prepare_sites(model, readout.selection, sites)
    values = ReadoutValues(readout)
    d_mlp = {layer: sites.layers[layer].d_mlp for layer in readout.selection.groups}
    first_layer = min(readout.selection.groups)
    handles: list[RemovableHandle] = []
    shape = TokenShape(model, sites, handles)

    def make_hook(layer: int) -> Callable[[nn.Module, tuple], None]:
        # Looked up once per context (built once per readout) on the layer's device, not per call.
        weight, bias = readout.dense(sites.layers[layer].down.weight.device, d_mlp)[layer]
        first = layer == first_layer

        def hook(_module: nn.Module, args: tuple) -> None:
            last = shape.unflatten(args[0]).select(1, -1)  # [b, d_mlp]
            # Each skipped op saves a dispatch on every token: serving is inference mode in float32.
            if last.requires_grad:
                last = last.detach()
            if last.dtype != torch.float32:
                last = last.float()
            values._add(last, weight, bias, first=first)

        return hook

    with registered(handles):
        for layer in readout.selection.groups:
            handles.append(sites.layers[layer].down.register_forward_pre_hook(make_hook(layer)))
        yield values
