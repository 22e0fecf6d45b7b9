"""Read a neuron file of either kind, check it against the model and turn it into weight rows.

MLP-activation sets (`models.artifact.neurons.NeuronSet`) come from contrasting; weight-row sets
(`models.weight_rows.WeightRowSet`) come from importance detection and carry a `module`
tensor indexing the comma-separated module names in `metadata['site']`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from neuronguard.models.weight_rows import AttentionShape, WeightRowSet, kv_row_for_query_index
from neuronguard.models.loading import LoadedModel
from neuronguard.models.artifact.neurons import MLP_SITE, NeuronSet, model_metadata
from neuronguard.models.artifact.io import file_sha256
from neuronguard.models.tuning.masks import RowSet, mlp_rows
from neuronguard.errors import UsageError

# Weight-row sets may index k/v rows in query space (one index per query head dimension);
# those are mapped onto the shared k/v rows of grouped-query attention.
KV_SPACE_KEY = "kv_index_space"


@dataclass
class LoadedSet:
    rows: list[RowSet]
    neurons: int  # neurons selected (after --k / --top-frac)
    kind: str  # "mlp" or "weight_rows"
    sha256: str
    metadata: dict[str, str]


def _metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise UsageError(f"neuron file '{path}' not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several types for unreadable files
        raise UsageError(f"'{path}' is not a valid neuron file ({exc}): rebuild it with `neuronguard identify`") from exc


def _check_model(metadata: dict[str, str], loaded: LoadedModel, path: Path) -> None:
    for key, value in model_metadata(loaded).items():
        have = metadata.get(key)
        if have is not None and have != value:
            raise UsageError(
                f"neuron set '{path}' was made for another model ({key}={have!r}, this model has {value!r}): "
                "rebuild it for this model with `neuronguard identify`"
            )


def _count(total: int, k: int | None, top_frac: float | None, universe: int) -> int:
    if k is not None and top_frac is not None:
        raise UsageError("give --k or --top-frac, not both")
    if top_frac is not None:
        if not 0 < top_frac <= 1:
            raise UsageError(f"--top-frac {top_frac} must be in (0, 1]")
        k = max(1, round(top_frac * universe))
    if k is None:
        return total
    if k <= 0:
        raise UsageError(f"--k {k} must be positive")
    return min(k, total)


def _weight_row_universe(loaded: LoadedModel) -> int:
    """How many weight-row neurons the model has (q/k/v/up rows and down columns)."""
    total = 0
    for s in loaded.sites.layers:
        total += sum(m.weight.shape[0] for m in (s.q, s.k, s.v) if m is not None) + 2 * s.d_mlp
    return total


def _weight_rows(path: Path, loaded: LoadedModel, k: int | None, top_frac: float | None) -> tuple[list[RowSet], int]:
    rows = WeightRowSet.load(path)  # sorted by descending score when written
    n = _count(len(rows), k, top_frac, _weight_row_universe(loaded))
    order = torch.argsort(rows.score, descending=True, stable=True)[:n]
    names = rows.metadata["site"].split(",")
    shape = AttentionShape.of(loaded) if any(name in ("k_proj", "v_proj") for name in names) else None
    result = []
    for code, name in enumerate(names):
        chosen = order[rows.module[order] == code]
        if chosen.numel() == 0:
            continue
        index = rows.index[chosen].long()
        if name in ("k_proj", "v_proj") and rows.metadata.get(KV_SPACE_KEY) == "query" and shape is not None:
            index = kv_row_for_query_index(index, shape.n_rep, shape.d_head)
        result.append(RowSet(name.removesuffix("_proj"), rows.layer[chosen].long(), index))
    return result, n


def load_set(
    path: str | Path,
    loaded: LoadedModel,
    k: int | None = None,
    top_frac: float | None = None,
    *,
    random_seed: int | None = None,
) -> LoadedSet:
    """The top neurons of a neuron file as weight rows of `loaded`, refusing another model's set.

    With `random_seed`, the same number of random MLP neurons per layer instead (the baseline).
    """
    path = Path(path)
    metadata = _metadata(path)
    _check_model(metadata, loaded, path)
    if metadata.get("site", MLP_SITE) == MLP_SITE:
        neurons = NeuronSet.load(path, loaded)
        n = _count(len(neurons), k, top_frac, loaded.sites.num_neurons)
        chosen = neurons.top(n)
        if random_seed is not None:
            chosen = chosen.random_like(loaded.sites.d_mlp, random_seed)
        return LoadedSet(mlp_rows(chosen), n, "mlp", file_sha256(path), metadata)
    if random_seed is not None:
        raise UsageError("random neurons are drawn for MLP-activation sets only; this is a weight-row set")
    rows, n = _weight_rows(path, loaded, k, top_frac)
    return LoadedSet(rows, n, "weight_rows", file_sha256(path), metadata)
