"""Hook context managers: read, overwrite or scale chosen neurons, and always clean up.

PyTorch hooks are global state on a shared model, so every hook here lives inside a context
manager that removes its handles in `finally`, also when the forward pass raises. All
operations are vectorised per layer (one gather/scatter per layer and forward call); there
is no Python loop over neurons or tokens. The guard's per-token readout lives in
`models.readout`, the patch source's truncated pass in `models.truncated_forward`.

Shapes: `b` batch, `s` positions of one forward call, `k` selected neurons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.sites import NeuronSites, resolve_sites


class DeviceCache:
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


def prepare_sites(model: nn.Module, selection: NeuronSelection, sites: NeuronSites | None) -> NeuronSites:
    """The model's sites (resolved unless given), after checking that the selection fits them."""
    sites = sites or resolve_sites(model)
    selection.validate(sites)
    return sites


@contextmanager
def registered(handles: list[RemovableHandle]) -> Iterator[None]:
    """Remove every handle appended to `handles` on exit, also when the body raises."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


class TokenShape:
    """Remembers (batch, positions) of the current forward call.

    Some architectures (OPT) flatten tokens to [b*s, d] inside the MLP; hooks use this to
    restore the [b, s, d] layout so activations stay per batch row. It reads the input of
    the first decoder block, which every call passes through: a top-level call, and a call
    of the decoder stack alone (a truncated patch-source pass).
    """

    def __init__(self, model: nn.Module, sites: NeuronSites, handles: list[RemovableHandle]) -> None:
        self.shape: tuple[int, int] | None = None
        first_block = model.get_submodule(sites.layers_path)[0]
        handles.append(first_block.register_forward_pre_hook(self._record, with_kwargs=True))

    def _record(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.shape = tuple(hidden.shape[:2]) if isinstance(hidden, torch.Tensor) and hidden.ndim == 3 else None

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


def capture_hook(cap: Capture, cache: DeviceCache, shape: TokenShape, layer: int) -> Callable[[nn.Module, tuple], None]:
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
    sites = prepare_sites(model, selection, sites)
    cap = Capture(selection, positions)
    cache = DeviceCache(selection)
    handles: list[RemovableHandle] = []
    shape = TokenShape(model, sites, handles)
    with registered(handles):
        for layer in selection.groups:
            handles.append(sites.layers[layer].down.register_forward_pre_hook(capture_hook(cap, cache, shape, layer)))
        yield cap


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
    sites = prepare_sites(model, selection, sites)
    state = Patch(selection, values)
    cache = DeviceCache(selection)
    handles: list[RemovableHandle] = []
    first_layer = min(selection.groups)
    shape = TokenShape(model, sites, handles)

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

    with registered(handles):
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
    sites = prepare_sites(model, selection, sites)
    cache = DeviceCache(selection)
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

    with registered(handles):
        for layer in selection.groups:
            handles.append(sites.layers[layer].down.register_forward_pre_hook(make_hook(layer)))
        yield


@contextmanager
def zero(model: nn.Module, selection: NeuronSelection, *, sites: NeuronSites | None = None) -> Iterator[None]:
    """Deactivate the selected neurons (activation set to 0)."""
    with scale(model, selection, 0.0, sites=sites):
        yield


def decoder_stack(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (`base_model` of a Hugging Face model)."""
    return getattr(model, "base_model", model)


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere in the model: 0 when nothing leaked."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
