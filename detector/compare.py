"""Comparing two neuron sets: Jaccard overlap of their top-k and Spearman correlation of scores."""

from __future__ import annotations

import torch
from scipy.stats import spearmanr

from neuronguard.models.artifact.neurons import NeuronSet
from neuronguard.errors import UsageError


def _keys(neurons: NeuronSet, width: int) -> torch.Tensor:
    return neurons.layer.long() * width + neurons.index.long()


def compare_sets(a: NeuronSet, b: NeuronSet, k: int) -> dict[str, float | int]:
    """Jaccard of the top-k of each; Spearman over the neurons both sets score."""
    for key in ("num_hidden_layers", "intermediate_size"):
        if a.metadata.get(key) != b.metadata.get(key):
            raise UsageError(f"neuron sets are for different architectures ({key}: {a.metadata.get(key)} vs {b.metadata.get(key)})")
    width = int(a.metadata["intermediate_size"])
    top_a, top_b = set(_keys(a.top(k), width).tolist()), set(_keys(b.top(k), width).tolist())
    keys_a, keys_b = _keys(a, width), _keys(b, width)
    common, in_a, in_b = (torch.as_tensor(x) for x in _intersect(keys_a, keys_b))
    rho = float(spearmanr(a.score[in_a].numpy(), b.score[in_b].numpy()).statistic) if len(common) > 2 else float("nan")
    return {"k": k, "jaccard": len(top_a & top_b) / len(top_a | top_b), "spearman": rho, "common_neurons": int(len(common))}


def _intersect(a: torch.Tensor, b: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """Shared keys and their positions in a and b (vectorised through sorting)."""
    sorted_b, order_b = torch.sort(b)
    pos = torch.searchsorted(sorted_b, a).clamp(max=len(b) - 1)
    hit = sorted_b[pos] == a
    return a[hit].tolist(), torch.nonzero(hit).flatten().tolist(), order_b[pos[hit]].tolist()
