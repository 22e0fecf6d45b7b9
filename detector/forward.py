"""Batched teacher-forced forward passes with per-layer MLP-input hooks.

Detector passes see whole sequences (no KV cache), so hooks receive `[b, s, d_mlp]` with the
batch shape known in advance; the hooks live in a context manager that always removes them.
Prompts are cut into batches in one place (`rank_batches`), so in a torchrun group every rank
runs whole batches exactly as one process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from neuronguard.models.batching import Batch, left_pad
from neuronguard.models.distributed import is_writer, shard
from neuronguard.models.loading import LoadedModel
from neuronguard.models.sites import NeuronSites

LayerFn = Callable[[int, torch.Tensor], None]


@contextmanager
def on_mlp_inputs(model: nn.Module, sites: NeuronSites, shape: tuple[int, int], fn: LayerFn) -> Iterator[None]:
    """Call `fn(layer, x)` with every layer's MLP activation `x` [b, s, d_mlp] (read-only)."""
    handles = []

    def make_hook(layer: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            fn(layer, args[0].detach().reshape(*shape, -1))

        return hook

    try:
        for layer_sites in sites.layers:
            handles.append(layer_sites.down.register_forward_pre_hook(make_hook(layer_sites.index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def pad_batch(loaded: LoadedModel, sequences: Sequence[Sequence[int]]) -> Batch:
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    return left_pad(sequences, pad_id, loaded.device)


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rank_batches(items: Sequence, size: int, desc: str, *, leave: bool = True) -> tqdm:
    """This rank's contiguous run of `size`-item batches (all of them in one process), with a
    progress bar on rank 0 only."""
    return tqdm(shard(list(chunks(items, size))), desc=desc, unit="batch", leave=leave, disable=not is_writer())
