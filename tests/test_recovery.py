"""Recovery of a planted per-neuron change: precision@k and Spearman against the known truth."""

from __future__ import annotations

import pytest
import torch

from neuronguard.detector.recovery import recovery
from neuronguard.models.artifact.neurons import NeuronSet


def _metadata(layers: int, width: int) -> dict[str, str]:
    return {"model_type": "llama", "num_hidden_layers": str(layers), "intermediate_size": str(width),
            "config_sha256": "x", "method": "test"}


def test_a_ranking_equal_to_the_truth_recovers_it_fully_and_a_shuffle_does_not() -> None:
    gen = torch.Generator().manual_seed(0)
    truth = torch.rand(3, 64, generator=gen)
    exact = recovery(NeuronSet.from_scores(truth, _metadata(3, 64)), truth, [5, 20])
    assert exact["precision_at_k"] == {"5": 1.0, "20": 1.0} and exact["spearman"] == pytest.approx(1.0)
    shuffled = truth.flatten()[torch.randperm(192, generator=gen)].view(3, 64)
    chance = recovery(NeuronSet.from_scores(shuffled, _metadata(3, 64)), truth, [20])
    assert chance["precision_at_k"]["20"] < 0.5 and abs(chance["spearman"]) < 0.3
    assert chance["chance_precision_at_k"]["20"] == pytest.approx(20 / 192)


def test_recovery_needs_a_full_ranking() -> None:
    truth = torch.rand(2, 8)
    with pytest.raises(ValueError, match="all 16 neurons"):
        recovery(NeuronSet.from_scores(truth, _metadata(2, 8)).top(4), truth, [2])
