"""Hook context managers: read, overwrite or scale chosen neurons, and always clean up.

PyTorch hooks are global state on a shared model, so every hook here lives inside a context
manager that removes its handles in `finally`, also when the forward pass raises. All
operations are vectorised per layer (one gather/scatter per layer and forward call); there
is no Python loop over neurons or tokens.

Shapes: `b` batch, `s` positions of one forward call, `k` selected neurons.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from models.selected_mlp import SelectedMLP
from models.sites import NeuronSites, resolve_sites
from neuronguard.errors import UsageError


@dataclass(frozen=True)
class NeuronSelection:
    """An ordered list of (layer, index) neurons; activations are laid out in this order."""

    layers: torch.Tensor  # int64 [k]
    indices: torch.Tensor  # int64 [k]
    _groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        layers = torch.as_tensor(self.layers, dtype=torch.long).flatten().cpu()
        indices = torch.as_tensor(self.indices, dtype=torch.long).flatten().cpu()
        if layers.shape != indices.shape:
            raise UsageError("neuron selection needs as many layer ids as neuron indices")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "indices", indices)
        groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in torch.unique(layers).tolist():
            order = torch.nonzero(layers == layer).flatten()  # positions in the k-vector
            groups[int(layer)] = (order, indices[order])
        object.__setattr__(self, "_groups", groups)

    @classmethod
    def all(cls, sites: NeuronSites) -> NeuronSelection:
        """Every MLP neuron, layer-major."""
        layers = torch.cat([torch.full((s.d_mlp,), s.index, dtype=torch.long) for s in sites.layers])
        indices = torch.cat([torch.arange(s.d_mlp) for s in sites.layers])
        return cls(layers, indices)

    def __len__(self) -> int:
        return int(self.layers.numel())

    @property
    def groups(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (positions in the k-vector, neuron indices in that layer)."""
        return self._groups

    @property
    def max_layer(self) -> int:
        return int(self.layers.max()) if len(self) else -1

    def validate(self, sites: NeuronSites) -> None:
        if len(self) == 0:
            raise UsageError("the neuron selection is empty")
        if self.max_layer >= sites.num_layers or int(self.layers.min()) < 0:
            raise UsageError(f"neuron selection names layer {self.max_layer}, the model has {sites.num_layers}")
        for layer, (_, idx) in self.groups.items():
            width = sites.layers[layer].d_mlp
            if int(idx.max()) >= width or int(idx.min()) < 0:
                raise UsageError(f"neuron index {int(idx.max())} out of range for layer {layer} (MLP width {width})")


class _DeviceCache:
    """Per-device copies of index tensors, so hooks never copy indices on the hot path."""

    def __init__(self, selection: NeuronSelection) -> None:
        self.selection = selection
        self._cache: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, layer)
        if key not in self._cache:
            order, idx = self.selection.groups[layer]
            self._cache[key] = (order.to(device), idx.to(device))
        return self._cache[key]


def _prepare(model: nn.Module, selection: NeuronSelection, sites: NeuronSites | None) -> NeuronSites:
    sites = sites or resolve_sites(model)
    selection.validate(sites)
    return sites


@contextmanager
def _registered(handles: list[RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


class _TokenShape:
    """Remembers (batch, positions) of the current forward call.

    Some architectures (OPT) flatten tokens to [b*s, d] inside the MLP; hooks use this to
    restore the [b, s, d] layout so activations stay per batch row.
    """

    def __init__(self, model: nn.Module, handles: list[RemovableHandle]) -> None:
        self.shape: tuple[int, int] | None = None
        handles.append(model.register_forward_pre_hook(self._record, with_kwargs=True))

    def _record(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        self.shape = tuple(tokens.shape[:2]) if tokens is not None else None

    def unflatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return x
        if self.shape is None or self.shape[0] * self.shape[1] != x.shape[0]:
            raise RuntimeError(f"cannot map MLP input of shape {tuple(x.shape)} to (batch, positions)")
        return x.view(*self.shape, x.shape[-1])


class Capture:
    """Activations of the selected neurons, recorded per forward call.

    With a KV cache each decoding step is one call holding only the new positions, so the
    concatenation over calls equals the activations of one full forward pass. With
    `positions="last"` only the latest call's last position is kept (one slot per layer, no
    growing lists): the decoding loop reads it once per step.
    """

    def __init__(self, selection: NeuronSelection, positions: Literal["all", "last"] = "all") -> None:
        self.selection = selection
        self.positions = positions
        self._per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in selection.groups}
        self._latest: dict[int, torch.Tensor] = {}
        # Layer-major concatenation followed by one gather restores selection order.
        layer_major = torch.cat([selection.groups[layer][0] for layer in self._per_layer])
        self._to_selection_order = torch.argsort(layer_major)
        self._order_on: dict[torch.device, torch.Tensor] = {}

    def _record(self, layer: int, values: torch.Tensor) -> None:
        if self.positions == "last":
            self._latest[layer] = values
        else:
            self._per_layer[layer].append(values)

    def clear(self) -> None:
        self._latest.clear()
        for values in self._per_layer.values():
            values.clear()

    def _in_selection_order(self, layer_major: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        device = layer_major.device
        if device not in self._order_on:
            self._order_on[device] = self._to_selection_order.to(device)
        return layer_major.index_select(-1, self._order_on[device]).to(dtype)

    def activations(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[b, total positions, k] in selection order, concatenated over forward calls."""
        if self.positions == "last":
            return self.last(dtype)[:, None, :]
        counts = {len(v) for v in self._per_layer.values()}
        if counts == {0}:
            raise RuntimeError("no forward pass ran inside this capture")
        if len(counts) != 1:
            raise RuntimeError("layers recorded different numbers of forward calls (was the pass cut short?)")
        per_layer = [torch.cat(chunks, dim=1) for chunks in self._per_layer.values()]
        return self._in_selection_order(torch.cat(per_layer, dim=-1), dtype)

    def latest_by_layer(self) -> dict[int, torch.Tensor]:
        """layer -> [b, s, k_layer] from the last forward call, in the selection's per-layer order.

        `Patch.set` takes this as is: handing a capture to a patch of the same selection then
        needs no reordering into selection order and back.
        """
        if self.positions == "last" or any(not chunks for chunks in self._per_layer.values()):
            raise RuntimeError("latest_by_layer needs a capture of all positions with one complete forward pass")
        return {layer: chunks[-1] for layer, chunks in self._per_layer.items()}

    def last(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[b, k] activations at the last position of the last forward call."""
        if self.positions == "last":
            if len(self._latest) != len(self._per_layer):
                raise RuntimeError("no complete forward pass ran inside this capture since the last clear()")
            latest = [self._latest[layer] for layer in self._per_layer]
        else:
            latest = [chunks[-1][:, -1, :] for chunks in self._per_layer.values()]
        return self._in_selection_order(torch.cat(latest, dim=-1), dtype)


def _capture_hook(cap: Capture, cache: _DeviceCache, shape: _TokenShape, layer: int):
    """Forward pre-hook of a down projection that records the layer's selected neurons."""

    def hook(_module: nn.Module, args: tuple) -> None:
        x = shape.unflatten(args[0])  # [b, s, d_mlp]
        _, idx = cache.get(layer, x.device)
        picked = x[:, -1] if cap.positions == "last" else x
        cap._record(layer, picked.detach().index_select(-1, idx))

    return hook


@contextmanager
def capture(
    model: nn.Module,
    selection: NeuronSelection,
    *,
    sites: NeuronSites | None = None,
    positions: Literal["all", "last"] = "all",
) -> Iterator[Capture]:
    """Record the selected neurons' activations (detached) during every forward call."""
    sites = _prepare(model, selection, sites)
    cap = Capture(selection, positions)
    cache = _DeviceCache(selection)
    handles: list[RemovableHandle] = []
    shape = _TokenShape(model, handles)
    with _registered(handles):
        for layer in selection.groups:
            handles.append(sites.layers[layer].down.register_forward_pre_hook(_capture_hook(cap, cache, shape, layer)))
        yield cap


@dataclass(frozen=True)
class LinearReadout:
    """Linear functions of the selected neurons (probe logits): `activations @ weight + bias`.

    `weight` is [k, heads] in selection order; a head that ignores a neuron has a zero there,
    so several probes over nested neuron sets share one readout.
    """

    selection: NeuronSelection
    weight: torch.Tensor  # [k, heads]
    bias: torch.Tensor  # [heads]

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.weight.shape[0] != len(self.selection) or self.bias.shape != self.weight.shape[1:]:
            raise UsageError(f"readout weight must be [k={len(self.selection)}, heads] and bias [heads]")

    def dense_weights(self, d_mlp: dict[int, int]) -> dict[int, torch.Tensor]:
        """layer -> [d_mlp, heads] float32 with zero rows for unselected neurons."""
        dense = {}
        for layer, (order, idx) in self.selection.groups.items():
            w = torch.zeros(d_mlp[layer], self.weight.shape[1], dtype=torch.float32)
            w[idx] = self.weight[order].float()
            dense[layer] = w
        return dense


class ReadoutValues:
    """The readout at the last position of the latest forward call, summed over layers by the hooks."""

    def __init__(self, readout: LinearReadout) -> None:
        self.readout = readout
        self.layers_seen = 0
        self.sum: torch.Tensor | None = None  # [b, heads]: bias plus every layer seen so far

    def clear(self) -> None:
        self.layers_seen = 0

    def _add(self, last: torch.Tensor, dense_weight: torch.Tensor, bias: torch.Tensor, *, first: bool) -> None:
        """Add one layer's term; the first selected layer of a forward call starts a new sum from the bias."""
        if first:
            self.sum = torch.addmm(bias, last, dense_weight)
            self.layers_seen = 1
        else:
            assert self.sum is not None
            self.sum.addmm_(last, dense_weight)
            self.layers_seen += 1

    def logits(self) -> torch.Tensor:
        """[b, heads] float32. The next forward call starts a new tensor, so this one stays valid."""
        if self.sum is None or self.layers_seen != len(self.readout.selection.groups):
            raise RuntimeError("no complete forward pass ran inside this readout since the last clear()")
        return self.sum


@contextmanager
def read_out(model: nn.Module, readout: LinearReadout, *, sites: NeuronSites | None = None) -> Iterator[ReadoutValues]:
    """Evaluate a linear readout of the selected neurons inside every forward call.

    Per layer the hook multiplies the last position's whole MLP activation with a dense
    [d_mlp, heads] weight and adds it to a running sum: one matrix product per layer, no
    gather and no concatenation, so a decoding step's probe logits exist when its forward
    ends. This is the serving path of the guard; `capture` remains for anything that needs
    the activations themselves.
    """
    sites = _prepare(model, readout.selection, sites)
    values = ReadoutValues(readout)
    dense = readout.dense_weights({layer: sites.layers[layer].d_mlp for layer in readout.selection.groups})
    on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
    first_layer = min(readout.selection.groups)
    handles: list[RemovableHandle] = []
    shape = _TokenShape(model, handles)

    def make_hook(layer: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            last = shape.unflatten(args[0]).select(1, -1).float()  # [b, d_mlp]; a no-op cast for float32 models
            key = (layer, last.device)
            if key not in on_device:
                on_device[key] = (dense[layer].to(last.device), readout.bias.to(last.device, torch.float32))
            weight, bias = on_device[key]
            values._add(last, weight, bias, first=layer == first_layer)

        return hook

    with _registered(handles):
        for layer in readout.selection.groups:
            handles.append(sites.layers[layer].down.register_forward_pre_hook(make_hook(layer)))
        yield values


PatchValues = torch.Tensor | dict[int, torch.Tensor] | None


class Patch:
    """Values written into the selected neurons on the next forward calls.

    `values` is [b, s, k] in selection order matching each call's positions, or a
    `Capture.latest_by_layer()` of the same selection; `None` lets activations through.
    """

    def __init__(self, selection: NeuronSelection, values: PatchValues) -> None:
        self.selection = selection
        self.values = values
        self.patched_positions = 0

    def set(self, values: PatchValues) -> None:
        self.values = values


@contextmanager
def patch(
    model: nn.Module,
    selection: NeuronSelection,
    values: PatchValues = None,
    *,
    sites: NeuronSites | None = None,
) -> Iterator[Patch]:
    """Overwrite the selected neurons' activations with given values (activation patching)."""
    sites = _prepare(model, selection, sites)
    state = Patch(selection, values)
    cache = _DeviceCache(selection)
    handles: list[RemovableHandle] = []
    first_layer = min(selection.groups)
    shape = _TokenShape(model, handles)

    def make_hook(layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            if state.values is None:
                return None
            original = args[0]
            x = shape.unflatten(original)  # [b, s, d_mlp]
            order, idx = cache.get(layer, x.device)
            if isinstance(state.values, dict):
                layer_values = state.values[layer]
            else:
                layer_values = state.values.to(device=x.device).index_select(-1, order)
            if layer_values.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"patch values cover {tuple(layer_values.shape[:2])} (batch, positions), the forward has {tuple(x.shape[:2])}"
                )
            # index_copy_ on a copy: several times cheaper per call than `x[..., idx] = values`.
            x = x.clone().index_copy_(-1, idx, layer_values.to(device=x.device, dtype=x.dtype))
            if layer == first_layer:
                state.patched_positions += x.shape[0] * x.shape[1]
            return (x.view(original.shape), *args[1:])

        return hook

    with _registered(handles):
        for layer in selection.groups:
            handles.append(sites.layers[layer].down.register_forward_pre_hook(make_hook(layer)))
        yield state


@contextmanager
def scale(
    model: nn.Module,
    selection: NeuronSelection,
    factor: float | torch.Tensor,
    *,
    sites: NeuronSites | None = None,
) -> Iterator[None]:
    """Multiply the selected neurons' activations by `factor` (scalar or [k])."""
    sites = _prepare(model, selection, sites)
    cache = _DeviceCache(selection)
    factors = torch.as_tensor(factor, dtype=torch.float32).expand(len(selection)).clone()
    handles: list[RemovableHandle] = []

    def make_hook(layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # [..., d_mlp]: scaling is per neuron, so no (batch, positions) layout needed
            order, idx = cache.get(layer, x.device)
            x = x.clone()
            x[..., idx] = x[..., idx] * factors.to(x.device, x.dtype).index_select(0, order)
            return (x, *args[1:])

        return hook

    with _registered(handles):
        for layer in selection.groups:
            handles.append(sites.layers[layer].down.register_forward_pre_hook(make_hook(layer)))
        yield


@contextmanager
def zero(model: nn.Module, selection: NeuronSelection, *, sites: NeuronSites | None = None) -> Iterator[None]:
    """Deactivate the selected neurons (activation set to 0)."""
    with scale(model, selection, 0.0, sites=sites):
        yield


class StopForward(Exception):
    """Raised inside a forward pass to skip the layers after the last one that matters."""


@contextmanager
def capture_until_deepest(
    model: nn.Module,
    selection: NeuronSelection,
    *,
    sites: NeuronSites | None = None,
    deepest: SelectedMLP | None = None,
) -> Iterator[Capture]:
    """Capture the selected neurons (all positions) and abort each forward pass once it has them.

    A patch source only needs activations up to the deepest layer holding a selected neuron,
    so the pass stops there (pair with `run_until_stop`), skipping every later block, the
    final norm and the LM head. Without `deepest` it stops right before that layer's down
    projection; with `deepest` (a `SelectedMLP` of that layer and its selected neurons) it
    stops before the layer's MLP and computes only the selected neurons. Attention has
    already written the layer's KV cache either way, so the cache stays valid for the next
    decoding step.
    """
    sites = _prepare(model, selection, sites)
    cap = Capture(selection, "all")
    cache = _DeviceCache(selection)
    handles: list[RemovableHandle] = []
    shape = _TokenShape(_decoder(model), handles)  # `run_until_stop` calls the decoder stack directly
    last_layer = selection.max_layer

    def stop(_module: nn.Module, _args: tuple) -> None:
        raise StopForward

    def selected_and_stop(_module: nn.Module, args: tuple) -> None:
        assert deepest is not None
        cap._record(last_layer, deepest(shape.unflatten(args[0])).detach())
        raise StopForward

    with _registered(handles):
        for layer in selection.groups:
            if layer != last_layer:
                handles.append(sites.layers[layer].down.register_forward_pre_hook(_capture_hook(cap, cache, shape, layer)))
        last = sites.layers[last_layer]
        if deepest is not None:
            if deepest.mlp is not last.mlp or not torch.equal(deepest.indices, selection.groups[last_layer][1]):
                raise ValueError("the SelectedMLP was built for another layer or other neurons than this selection's deepest")
            handles.append(deepest.mlp.register_forward_pre_hook(selected_and_stop))
        else:
            handles.append(last.down.register_forward_pre_hook(_capture_hook(cap, cache, shape, last_layer)))
            handles.append(last.down.register_forward_pre_hook(stop))
        yield cap


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (`base_model` of a Hugging Face model)."""
    return getattr(model, "base_model", model)


def run_until_stop(model: nn.Module, **inputs: object) -> bool:
    """Run the model's decoder stack under `capture_until_deepest`; True when its hook cut the pass short.

    A stopped pass never reaches the LM head, so the head's wrapper is skipped altogether.
    """
    try:
        _decoder(model)(**inputs)
    except StopForward:
        return True
    return False


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere in the model: 0 when nothing leaked."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
