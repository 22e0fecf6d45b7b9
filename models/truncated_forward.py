"""The patch source's truncated forward: capture the patched neurons, then stop.

A patch source only needs activations up to the deepest layer holding a patched neuron.
Its pass runs the decoder stack alone (no LM head) and is aborted by an exception from a
hook once those activations exist; for a gated MLP the deepest layer computes just the
selected neurons (`SelectedMLP`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.hooks import Capture, DeviceCache, TokenShape, capture_hook, decoder_stack, prepare_sites, registered
from neuronguard.models.selected_mlp import SelectedMLP
from neuronguard.models.sites import NeuronSites
from neuronguard.errors import UsageError


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
    sites = prepare_sites(model, selection, sites)
    last_layer = selection.max_layer
    last = sites.layers[last_layer]
    if deepest is not None and (deepest.mlp is not last.mlp or not torch.equal(deepest.indices, selection.groups[last_layer][1])):
        raise UsageError("the SelectedMLP was built for another layer or other neurons than this selection's deepest")
    cap = Capture(selection, "all")
    cache = DeviceCache(selection)
    handles: list[RemovableHandle] = []
    shape = TokenShape(model, sites, handles)

    def stop(_module: nn.Module, _args: tuple) -> None:
        raise StopForward

    def selected_and_stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        assert deepest is not None
        hidden = args[0] if args else next(iter(kwargs.values()))  # blocks call their MLP with one input
        cap._record(last_layer, deepest(shape.unflatten(hidden)).detach())
        raise StopForward

    with registered(handles):
        for layer in selection.groups:
            if layer != last_layer:
                handles.append(sites.layers[layer].down.register_forward_pre_hook(capture_hook(cap, cache, shape, layer)))
        if deepest is not None:
            handles.append(deepest.mlp.register_forward_pre_hook(selected_and_stop, with_kwargs=True))
        else:
            handles.append(last.down.register_forward_pre_hook(capture_hook(cap, cache, shape, last_layer)))
            handles.append(last.down.register_forward_pre_hook(stop))
        yield cap


def run_until_stop(model: nn.Module, **inputs: object) -> bool:
    """Run the model's decoder stack under `capture_until_deepest`; True when its hook cut the pass short.

    A stopped pass never reaches the LM head, so the head's wrapper is skipped altogether.
    """
    try:
        decoder_stack(model)(**inputs)
    except StopForward:
        return True
    return False
