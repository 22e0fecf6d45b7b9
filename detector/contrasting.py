"""Generation-time activation contrasting: rank neurons by how differently two twins fire.

One model (the unaligned one by default) generates on harmful prompts; both models are then
teacher-forced on the same tokens and every MLP neuron is scored by the RMS difference of
its activations over the chosen positions. Only the sum of squared differences and the
token count are kept, so memory is O(neurons) whatever the corpus size, and statistics
from different batches or machines add up exactly (`ContrastStats.__add__`): under torchrun
each rank contrasts its own batches and the ranks' sums are added before ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neuronguard.detector.forward import on_mlp_inputs, pad_batch, rank_batches
from neuronguard.models.batching import forward_kwargs
from neuronguard.models.chat import encode_prompt
from neuronguard.models.distributed import all_reduce_sum
from neuronguard.models.generation import SamplingParams, generate_ids, stop_ids
from neuronguard.models.loading import LoadedModel, assert_same_architecture
from neuronguard.models.artifact.neurons import NeuronSet, model_metadata
from neuronguard.models.artifact.io import atomic_write
from neuronguard.errors import UsageError

Positions = Literal["completion", "prompt", "all", "last"]
Generator = Literal["unaligned", "aligned"]
STATS_FORMAT = "neuronguard.contrast_stats/1"


@dataclass
class ContrastStats:
    """Streamed statistics: S = sqrt(sum_sq / count) per neuron."""

    sum_sq: torch.Tensor  # float64 [layers, d_mlp]
    count: int
    fingerprint: str

    @classmethod
    def empty(cls, loaded: LoadedModel) -> ContrastStats:
        sites = loaded.sites
        return cls(torch.zeros(sites.num_layers, sites.d_mlp, dtype=torch.float64), 0, loaded.fingerprint)

    def __add__(self, other: ContrastStats) -> ContrastStats:
        if self.fingerprint != other.fingerprint or self.sum_sq.shape != other.sum_sq.shape:
            raise UsageError("contrast statistics come from different models and cannot be merged")
        return ContrastStats(self.sum_sq + other.sum_sq, self.count + other.count, self.fingerprint)

    def summed_over_ranks(self) -> ContrastStats:
        """Every rank's sums and counts added (the statistics themselves in one process)."""
        total = all_reduce_sum({"sum_sq": self.sum_sq, "count": torch.tensor(self.count, dtype=torch.int64)})
        return ContrastStats(total["sum_sq"], int(total["count"]), self.fingerprint)

    def scores(self) -> torch.Tensor:
        """[layers, d_mlp] RMS activation difference."""
        if self.count == 0:
            raise UsageError("no positions were contrasted (every completion was empty?): raise --max-new-tokens")
        return (self.sum_sq / self.count).sqrt().float()

    def save(self, path: str | Path) -> None:
        meta = {"format": STATS_FORMAT, "count": str(self.count), "config_sha256": self.fingerprint}
        atomic_write(Path(path), lambda tmp: save_file({"sum_sq": self.sum_sq.contiguous()}, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> ContrastStats:
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
                sum_sq = handle.get_tensor("sum_sq")
        except Exception as exc:  # safetensors raises several types for unreadable files
            raise UsageError(f"'{path}' is not a contrast statistics file ({exc})") from exc
        if meta.get("format") != STATS_FORMAT:
            raise UsageError(f"'{path}' is not a {STATS_FORMAT} file")
        return cls(sum_sq, int(meta["count"]), meta["config_sha256"])


def position_mask(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], width: int, positions: Positions) -> torch.Tensor:
    """[b, width] bool: which positions of left-padded prompt+completion rows are contrasted."""
    column = torch.arange(width)[None, :]
    completion = torch.as_tensor(list(completion_lengths))[:, None]
    total = completion + torch.as_tensor(list(prompt_lengths))[:, None]
    start_completion = width - completion
    if positions == "completion":
        return column >= start_completion
    if positions == "prompt":
        return (column >= width - total) & (column < start_completion)
    if positions == "all":
        return column >= width - total
    return column == start_completion - 1


@torch.inference_mode()
def contrast_batch(aligned: LoadedModel, unaligned: LoadedModel, sequences: list[list[int]], mask: torch.Tensor) -> ContrastStats:
    """Teacher-force both models on the same rows; sum squared differences at `mask`."""
    batch = pad_batch(unaligned, sequences)
    mask = mask.to(batch.input_ids.device)
    shape = tuple(batch.input_ids.shape)
    stored: dict[int, torch.Tensor] = {}
    stats = ContrastStats.empty(unaligned)

    def keep(layer: int, x: torch.Tensor) -> None:
        stored[layer] = x[mask]  # [tokens, d_mlp], model dtype

    def accumulate(layer: int, x: torch.Tensor) -> None:
        diff = x[mask].float() - stored.pop(layer).float()
        stats.sum_sq[layer] += diff.pow(2).sum(0).double().cpu()

    with on_mlp_inputs(aligned.model, aligned.sites, shape, keep):
        aligned.model(**forward_kwargs(aligned.model, batch))
    with on_mlp_inputs(unaligned.model, unaligned.sites, shape, accumulate):
        unaligned.model(**forward_kwargs(unaligned.model, batch))
    stats.count = int(mask.sum())
    return stats


def contrast(
    aligned: LoadedModel,
    unaligned: LoadedModel,
    prompts: Sequence[str],
    *,
    generator: Generator = "unaligned",
    positions: Positions = "completion",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
) -> ContrastStats:
    """Contrast the twins on `prompts`; the result is a sum over batches (any split adds up).

    In a torchrun group each rank runs its shard of the batches and every rank gets the sum.
    """
    assert_same_architecture(aligned, unaligned)
    writer = unaligned if generator == "unaligned" else aligned
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop_token_ids=stop_ids(writer.tokenizer, writer.model)
    )
    stats = ContrastStats.empty(unaligned)
    for part in rank_batches(prompts, batch_size, "contrasting"):
        encoded = [encode_prompt(unaligned.tokenizer, p) for p in part]
        if positions in ("completion", "all"):
            completions = generate_ids(writer.model, pad_batch(writer, encoded), params, sites=writer.sites)
        else:
            completions = [[] for _ in encoded]
        sequences = [p + c for p, c in zip(encoded, completions)]
        width = max(len(s) for s in sequences)
        mask = position_mask([len(p) for p in encoded], [len(c) for c in completions], width, positions)
        stats = stats + contrast_batch(aligned, unaligned, sequences, mask)
    return stats.summed_over_ranks()


def ranked_neurons(stats: ContrastStats, unaligned: LoadedModel, provenance: dict[str, str]) -> NeuronSet:
    """Every neuron ranked by its contrast score, with the model identity and method."""
    return NeuronSet.from_scores(stats.scores(), {**model_metadata(unaligned), "tokens": str(stats.count), **provenance})
