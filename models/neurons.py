"""Neuron sets: ranked (layer, index, score) lists stored as safetensors + JSON metadata.

A set remembers the architecture it was computed on (model type, layer count, MLP width,
config fingerprint) and refuses to be used with another one. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from models.hooks import NeuronSelection
from models.loading import LoadedModel
from neuronguard.errors import UsageError

FORMAT = "neuronguard.neurons/1"
MLP_SITE = "mlp.down_proj.input"
REQUIRED_METADATA = ("model_type", "num_hidden_layers", "intermediate_size", "config_sha256", "method")


def model_metadata(loaded: LoadedModel) -> dict[str, str]:
    """The identity a neuron set records about the model it was computed on."""
    return {
        "model_type": str(loaded.model.config.model_type),
        "num_hidden_layers": str(loaded.sites.num_layers),
        "intermediate_size": str(loaded.sites.d_mlp),
        "config_sha256": loaded.fingerprint,
    }


@dataclass
class NeuronSet:
    """Neurons sorted by descending score; `metadata` holds provenance as strings."""

    layer: torch.Tensor  # int32 [n]
    index: torch.Tensor  # int32 [n]
    score: torch.Tensor  # float32 [n]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer = torch.as_tensor(self.layer).to(torch.int32).flatten()
        self.index = torch.as_tensor(self.index).to(torch.int32).flatten()
        self.score = torch.as_tensor(self.score).to(torch.float32).flatten()
        if not (self.layer.numel() == self.index.numel() == self.score.numel()):
            raise UsageError("neuron set tensors 'layer', 'index' and 'score' must have the same length")
        order = torch.argsort(self.score, descending=True, stable=True)
        self.layer, self.index, self.score = self.layer[order], self.index[order], self.score[order]
        self.metadata = {"format": FORMAT, "site": MLP_SITE, **{k: str(v) for k, v in self.metadata.items()}}

    def __len__(self) -> int:
        return int(self.layer.numel())

    @classmethod
    def from_scores(cls, scores: torch.Tensor, metadata: dict[str, str]) -> NeuronSet:
        """Rank every neuron of a [layers, d_mlp] score matrix."""
        n_layers, d_mlp = scores.shape
        layer = torch.arange(n_layers).repeat_interleave(d_mlp)
        index = torch.arange(d_mlp).repeat(n_layers)
        return cls(layer, index, scores.flatten(), metadata)

    def top(self, k: int) -> NeuronSet:
        if not 0 < k <= len(self):
            raise UsageError(f"k={k} is out of range: this neuron set has {len(self)} neurons")
        return NeuronSet(self.layer[:k], self.index[:k], self.score[:k], {**self.metadata, "k": str(k)})

    def top_fraction(self, fraction: float, total_neurons: int | None = None) -> NeuronSet:
        """The top `fraction` of all the model's neurons (not of this set)."""
        total = total_neurons or int(self.metadata["num_hidden_layers"]) * int(self.metadata["intermediate_size"])
        return self.top(max(1, min(len(self), round(fraction * total))))

    def selection(self) -> NeuronSelection:
        return NeuronSelection(self.layer.long(), self.index.long())

    def per_layer_counts(self, num_layers: int | None = None) -> list[int]:
        n = num_layers or int(self.metadata.get("num_hidden_layers", int(self.layer.max()) + 1))
        return torch.bincount(self.layer.long(), minlength=n).tolist()

    def random_like(self, d_mlp: int, seed: int) -> NeuronSet:
        """Random neurons with the same per-layer counts: the baseline of every experiment."""
        gen = torch.Generator().manual_seed(seed)
        layers, indices = [], []
        for layer, count in enumerate(self.per_layer_counts()):
            if count:
                layers.append(torch.full((count,), layer, dtype=torch.int32))
                indices.append(torch.randperm(d_mlp, generator=gen)[:count].to(torch.int32))
        layer = torch.cat(layers)
        return NeuronSet(layer, torch.cat(indices), torch.zeros(layer.numel()), {**self.metadata, "method": f"random(seed={seed})"})

    def check_model(self, loaded: LoadedModel) -> None:
        """Refuse a set computed for another architecture."""
        expected = model_metadata(loaded)
        for key, value in expected.items():
            have = self.metadata.get(key)
            if have is not None and have != value:
                raise UsageError(
                    f"neuron set was made for another model ({key}={have!r}, this model has {value!r}): "
                    "rebuild it for this model with `neuronguard identify`"
                )
        self.selection().validate(loaded.sites)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise ValueError(f"neuron set metadata lacks {missing}")
        tensors = {"layer": self.layer.contiguous(), "index": self.index.contiguous(), "score": self.score.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=self.metadata))
        return path

    @classmethod
    def load(cls, path: str | Path, model: LoadedModel | None = None) -> NeuronSet:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"neuron file '{path}' not found")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"'{path}' is not a valid neuron file ({exc}): rebuild it with `neuronguard identify`") from exc
        if metadata.get("format") != FORMAT or not {"layer", "index", "score"} <= tensors.keys():
            raise UsageError(f"'{path}' is not a {FORMAT} file: rebuild it with `neuronguard identify`")
        neuron_set = cls(tensors["layer"], tensors["index"], tensors["score"], metadata)
        if model is not None:
            neuron_set.check_model(model)
        return neuron_set


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))
