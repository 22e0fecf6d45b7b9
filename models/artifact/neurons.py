"""Neurons of the guard artifact: selections (which neurons a hook reads or writes) and ranked sets.

A `NeuronSet` is a ranked (layer, index, score) list stored as safetensors + JSON metadata;
its `selection()` is the ordered `NeuronSelection` the hooks lay activations out by.

A set remembers the architecture it was computed on (model type, layer count, MLP width,
config fingerprint) and refuses to be used with another one. Files are written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from neuronguard.models.artifact.io import atomic_write
from neuronguard.models.loading import LoadedModel
from neuronguard.models.sites import NeuronSites
from neuronguard.errors import UsageError

FORMAT = "neuronguard.neurons/1"
MLP_SITE = "mlp.down_proj.input"
REQUIRED_METADATA = ("model_type", "num_hidden_layers", "intermediate_size", "config_sha256", "method")


@dataclass(frozen=True)
class NeuronSelection:
    """An ordered list of (layer, index) neurons; activations are laid out in this order."""

    layers: torch.Tensor  # int64 [k]
    indices: torch.Tensor  # int64 [k]
    _groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        layers = torch.as_tensor(self.layers, dtype=torch.long).flatten().cpu()
        indices = torch.as_tensor(self.indices, dtype=torch.long).flatten().cpu()
        if layers.shape != indices.shape:
            raise UsageError("neuron selection needs as many layer ids as neuron indices")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "indices", indices)
        groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in torch.unique(layers).tolist():
            order = torch.nonzero(layers == layer).flatten()  # positions in the k-vector
            groups[int(layer)] = (order, indices[order])
        object.__setattr__(self, "_groups", groups)

    @classmethod
    def all(cls, sites: NeuronSites) -> NeuronSelection:
        """Every MLP neuron, layer-major."""
        layers = torch.cat([torch.full((s.d_mlp,), s.index, dtype=torch.long) for s in sites.layers])
        indices = torch.cat([torch.arange(s.d_mlp) for s in sites.layers])
        return cls(layers, indices)

    def __len__(self) -> int:
        return int(self.layers.numel())

    @property
    def groups(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (positions in the k-vector, neuron indices in that layer)."""
        return self._groups

    @property
    def max_layer(self) -> int:
        return int(self.layers.max()) if len(self) else -1

    def validate(self, sites: NeuronSites) -> None:
        if len(self) == 0:
            raise UsageError("the neuron selection is empty")
        if self.max_layer >= sites.num_layers or int(self.layers.min()) < 0:
            raise UsageError(f"neuron selection names layer {self.max_layer}, the model has {sites.num_layers}")
        for layer, (_, idx) in self.groups.items():
            width = sites.layers[layer].d_mlp
            if int(idx.max()) >= width or int(idx.min()) < 0:
                raise UsageError(f"neuron index {int(idx.max())} out of range for layer {layer} (MLP width {width})")


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
        missing = [key for key in expected if key not in self.metadata]
        if missing:
            raise UsageError(f"neuron set does not say which model it was made for (no {', '.join(missing)} in its "
                             "metadata) (fix: rebuild it for this model with `neuronguard identify`)")
        for key, value in expected.items():
            have = self.metadata[key]
            if have != value:
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
