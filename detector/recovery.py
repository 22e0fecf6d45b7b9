"""Recovery: how well a detected ranking finds neurons whose change is known (a positive control).

For a twin pair built by planting a per-neuron change, the ground truth is the change
itself, one number per MLP neuron. A detector that works ranks those neurons first:
precision@k is the share of the detected top k that are among the k most-changed neurons,
and Spearman's rho compares the whole ranking with the whole truth. For a pair whose
alignment was learned there is no such truth, and this report does not apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.stats import spearmanr

from neuronguard.models.artifact.neurons import NeuronSet
from neuronguard.models.loading import LoadedModel


@torch.no_grad()
def planted_truth(aligned: LoadedModel, unaligned: LoadedModel) -> torch.Tensor | None:
    """|s - 1| per MLP neuron [layers, d_mlp] when the twins differ only by a per-row scale `s` of
    each layer's up projection (the planted recipe); None for any other pair."""
    a, u = dict(aligned.model.named_parameters()), dict(unaligned.model.named_parameters())
    changed = [name for name in u if not torch.equal(a[name], u[name])]
    if not changed or not all(name.endswith("mlp.up_proj.weight") for name in changed):
        return None
    rows = []
    for site in unaligned.sites.layers:
        name = next((n for n in u if n.endswith(f"layers.{site.index}.mlp.up_proj.weight")), None)
        if name is None:
            return None
        wu, wa = u[name].double(), a[name].double()
        scale = (wa * wu).sum(1) / (wu * wu).sum(1).clamp_min(1e-30)
        if not torch.allclose(wa, scale[:, None] * wu, rtol=1e-4, atol=1e-6):
            return None  # not a per-row scale
        rows.append((scale - 1).abs().float())
    return torch.stack(rows)


def recovery(neurons: NeuronSet, truth: torch.Tensor, ks: Sequence[int]) -> dict[str, object]:
    """Precision@k for each k and Spearman of detected scores against `truth` [layers, d_mlp]."""
    n_layers, d_mlp = truth.shape
    if len(neurons) != n_layers * d_mlp:
        raise ValueError(f"recovery needs a ranking of all {n_layers * d_mlp} neurons, the set has {len(neurons)}")
    flat_truth = truth.flatten().double()
    detected_ids = (neurons.layer.long() * d_mlp + neurons.index.long())  # in detected order
    true_order = torch.argsort(flat_truth, descending=True, stable=True)
    detected_scores = torch.empty(n_layers * d_mlp, dtype=torch.float64)
    detected_scores[detected_ids] = neurons.score.double()
    rho = spearmanr(detected_scores.numpy(), flat_truth.numpy()).statistic
    precision = {}
    for k in ks:
        top_true = set(true_order[:k].tolist())
        precision[str(k)] = len(top_true & set(detected_ids[:k].tolist())) / k
    chance = {str(k): k / (n_layers * d_mlp) for k in ks}
    return {"precision_at_k": precision, "chance_precision_at_k": chance, "spearman": float(rho)}
