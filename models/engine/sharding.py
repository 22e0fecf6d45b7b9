"""Each tensor-parallel rank's slice of the MLP neurons, and the guard's work on that slice.

Llama-style tensor parallelism shards `down_proj` row-wise: on each rank its input is that
rank's contiguous slice of the layer's neurons. The guard never gathers activations: each
rank adds its slice's share of every probe logit and one all-reduce of the [rows, heads]
logits per step gives every rank the full sum; patching overwrites only the neurons a rank
owns. Every rank runs the same hooks on the same rows, so the collectives always match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from neuronguard.errors import UsageError
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.readout import Dense
from neuronguard.models.sites import NeuronSites


def _local_width(sites: NeuronSites, layer: int) -> int:
    weight = sites.layers[layer].down.weight
    if not isinstance(weight, DTensor):
        raise UsageError("tensor-parallel serving needs the model loaded with transformers' tensor parallelism")
    return int(weight.to_local().shape[-1])


@dataclass(frozen=True)
class MLPShard:
    """Where this rank's neurons start in each layer, and how many it holds."""

    offsets: tuple[int, ...]  # per layer
    widths: tuple[int, ...]
    root: bool  # the rank that adds the readout's bias (it is added once)
    group: dist.ProcessGroup

    @classmethod
    def discover(cls, sites: NeuronSites, group: dist.ProcessGroup, cpu_group: dist.ProcessGroup) -> MLPShard:
        """Read the local widths and learn the others' (one gather at start-up): slices follow rank order."""
        widths = [_local_width(sites, layer) for layer in range(sites.num_layers)]
        everyone: list[list[int] | None] = [None] * dist.get_world_size(cpu_group)
        dist.all_gather_object(everyone, widths, group=cpu_group)
        rank = dist.get_rank(cpu_group)
        offsets = []
        for layer in range(sites.num_layers):
            total = sum(w[layer] for w in everyone if w is not None)
            if total != sites.layers[layer].d_mlp:
                raise UsageError(f"layer {layer}'s MLP is not split into slices of its {sites.layers[layer].d_mlp} neurons")
            offsets.append(sum(w[layer] for w in everyone[:rank] if w is not None))
        return cls(tuple(offsets), tuple(widths), rank == 0, group)

    def check_same(self, other: NeuronSites) -> None:
        """The patch source must be sharded exactly like the served model (same neurons on each rank)."""
        widths = tuple(_local_width(other, layer) for layer in range(other.num_layers))
        if widths != self.widths:
            raise UsageError("the patch source is sharded differently from the served model: use a twin of the same architecture")

    def readout(self, dense: Dense) -> Dense:
        """The rows of each layer's dense readout weight that this rank's neurons multiply; the bias on one rank only."""
        local: Dense = {}
        for layer, (weight, bias) in dense.items():
            start = self.offsets[layer]
            local[layer] = (weight[start : start + self.widths[layer]].contiguous(), bias if self.root else torch.zeros_like(bias))
        return local

    def indices(self, selection: NeuronSelection) -> dict[int, torch.Tensor]:
        """Every selected layer -> the selected neurons this rank owns, as local indices (possibly none)."""
        local = {}
        for layer, (_, idx) in selection.groups.items():
            start = self.offsets[layer]
            mine = idx[(idx >= start) & (idx < start + self.widths[layer])]
            local[layer] = mine - start
        return local

    def start_all_reduce(self, total: torch.Tensor) -> dist.Work:
        """Start summing the ranks' partial readouts in place (wait on the result before reading it):
        every rank then holds the same logits."""
        work = dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        assert work is not None
        return work
