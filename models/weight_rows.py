"""Weight-row neurons: rows of q/k/v/up projections and columns of the down projection.

Importance detection (`detector.importance`) produces them and SN-Tune (`models.tuning`)
trains them, so their file format and the grouped-query-attention index mapping live here,
below both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neuronguard.models.loading import LoadedModel
from neuronguard.models.artifact.neurons import FORMAT as NEURONS_FORMAT
from neuronguard.models.artifact.io import atomic_write
from neuronguard.errors import UsageError

MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def kv_row_for_query_index(j: torch.Tensor | int, n_rep: int, d_head: int) -> torch.Tensor | int:
    """k/v row read by query-space index j under grouped-query attention (not `j // n_rep`)."""
    return (j // (n_rep * d_head)) * d_head + j % d_head


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    d_head: int

    @classmethod
    def of(cls, loaded: LoadedModel) -> AttentionShape:
        config = loaded.model.config
        heads = int(config.num_attention_heads)
        d_head = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(heads, int(getattr(config, "num_key_value_heads", None) or heads), d_head)

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class WeightRowSet:
    """Weight-row neurons (module, layer, row) ranked by mean importance.

    Stored like a NeuronSet plus an int `module` tensor indexing `metadata['site']`
    (comma-separated module names); down_proj entries are *columns*.
    """

    module: torch.Tensor  # int32 [n]
    layer: torch.Tensor  # int32 [n]
    index: torch.Tensor  # int32 [n]
    score: torch.Tensor  # float32 [n]
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.layer.numel())

    def counts(self) -> dict[str, int]:
        names = self.metadata["site"].split(",")
        return {name: int((self.module == i).sum()) for i, name in enumerate(names)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {"module": self.module, "layer": self.layer, "index": self.index, "score": self.score}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=self.metadata))
        return path

    @classmethod
    def load(cls, path: str | Path) -> WeightRowSet:
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:  # safetensors raises several types for unreadable files
            raise UsageError(f"'{path}' is not a valid neuron file ({exc})") from exc
        if meta.get("format") != NEURONS_FORMAT or "module" not in tensors:
            raise UsageError(f"'{path}' is not a weight-row neuron file (no 'module' tensor)")
        return cls(tensors["module"], tensors["layer"], tensors["index"], tensors["score"], meta)
