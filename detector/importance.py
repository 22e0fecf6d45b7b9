"""Accelerated importance detection: every weight-row neuron's importance in one forward pass.

Importance of a neuron on a query = norm of the change of its module's output when the
neuron is zeroed, over the query's tokens:
- FFN neuron j (up_proj row j, down_proj column j), exact: `||h[:, j]|| * ||W_down[:, j]||`.
- Attention Q/K dimension d of a head, approximated by the attention-map change
  `|| softmax((QK^T - Q[:,d] K[:,d]^T) / sqrt(d_h)) - softmax(QK^T / sqrt(d_h)) ||`
  (Q, K after RoPE; the scale is applied to both terms). Zeroing Q[:, d] of head h or K[:, d]
  of its kv head removes the same term, so a kv row's importance is the norm over the
  query heads that share it. Computed per query row, chunked over d_head so memory stays
  below `chunk_elements` floats.
- V dimension d of kv head g, like FFN through the output projection:
  `||V[:, d]|| * sqrt(sum_{h uses g} ||W_o[:, h*d_h + d]||^2)` (attention mixing ignored).
A neuron is *activated* on a query when its importance is in the top `per_query_top` share
of its (layer, module), or at least `epsilon`; safety neurons are activated on at least
`min_fraction` of the queries (1.0 = every query). Statistics stream: memory is O(neurons),
and they are counts and sums over queries, so under torchrun each rank scores its own batches
and the ranks' statistics add up exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from neuronguard.detector.forward import on_mlp_inputs, pad_batch, rank_batches
from neuronguard.models.batching import forward_kwargs
from neuronguard.models.chat import encode_prompt
from neuronguard.models.distributed import all_reduce_sum
from neuronguard.models.loading import LoadedModel
from neuronguard.models.artifact.neurons import FORMAT as NEURONS_FORMAT
from neuronguard.models.artifact.neurons import MLP_SITE, NeuronSet, model_metadata
from neuronguard.models.weight_rows import MODULES, AttentionShape, WeightRowSet

FFN_MODULES: tuple[str, ...] = ("up_proj", "down_proj")


def down_column_norms(down: nn.Module) -> torch.Tensor:
    """[d_mlp] norm of the output direction each MLP neuron writes (Linear or GPT-2 Conv1D)."""
    weight = down.weight.detach().float()
    return weight.norm(dim=1) if type(down).__name__ == "Conv1D" else weight.norm(dim=0)


def _rotate(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """Apply rotary embeddings (rotate-half convention) to [heads, s, d_head]."""
    if cos is None or sin is None:
        return x
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def qk_importance(q: torch.Tensor, k: torch.Tensor, n_rep: int, chunk_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-map change per Q dimension [H, d_h] and per K dimension [G, d_h] for one query.

    q [H, s, d_h], k [G, s, d_h] (real tokens only, RoPE applied).
    """
    heads, s, d_head = q.shape
    k = k.repeat_interleave(n_rep, dim=0)  # [H, s, d_h]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    neg = torch.finfo(torch.float32).min
    full = q @ k.transpose(-1, -2) / math.sqrt(d_head)  # [H, s, s]
    base = torch.softmax(full.masked_fill(~causal, neg), dim=-1)
    step = max(1, chunk_elements // max(1, heads * s * s))
    per_q = torch.empty(heads, d_head, device=q.device)
    for start in range(0, d_head, step):
        qc, kc = q[..., start : start + step], k[..., start : start + step]  # [H, s, c]
        term = torch.einsum("hmc,hnc->hcmn", qc, kc) / math.sqrt(d_head)  # [H, c, s, s]
        ablated = torch.softmax((full[:, None] - term).masked_fill(~causal, neg), dim=-1)
        per_q[:, start : start + step] = (ablated - base[:, None]).pow(2).sum((-1, -2)).sqrt()
    per_k = per_q.pow(2).view(-1, n_rep, d_head).sum(1).sqrt()  # kv head g serves heads g*n_rep..
    return per_q, per_k


def _attention_widths(shape: AttentionShape) -> dict[str, int]:
    """Neurons per layer of each attention projection: query dimensions, and kv dimensions for K and V."""
    return {"q_proj": shape.heads * shape.d_head, "k_proj": shape.kv_heads * shape.d_head, "v_proj": shape.kv_heads * shape.d_head}


@dataclass
class ImportanceStats:
    """Streamed per-module counts of 'activated' queries and summed importance (all additive)."""

    activated: dict[str, torch.Tensor]  # module -> int64 [layers, width]
    total: dict[str, torch.Tensor]  # module -> float64 [layers, width]
    queries: int = 0

    @classmethod
    def empty(cls, loaded: LoadedModel, attention: bool = True) -> ImportanceStats:
        """Zeros for every module `batch_importance` scores on this model (the same keys on every rank)."""
        widths = {name: loaded.sites.d_mlp for name in FFN_MODULES}
        if attention and _attention_modules(loaded) is not None:
            widths.update(_attention_widths(AttentionShape.of(loaded)))
        layers = loaded.sites.num_layers
        return cls({m: torch.zeros(layers, w, dtype=torch.int64) for m, w in widths.items()},
                   {m: torch.zeros(layers, w, dtype=torch.float64) for m, w in widths.items()})

    def add(self, module: str, importance: torch.Tensor, per_query_top: float, epsilon: float | None) -> None:
        """importance [b, layers, width] for b queries."""
        if epsilon is not None:
            active = importance >= epsilon
        else:
            keep = max(1, math.ceil(per_query_top * importance.shape[-1]))
            threshold = importance.topk(keep, dim=-1).values[..., -1:]
            active = importance >= threshold
        self.activated[module] += active.sum(0).cpu()
        self.total[module] += importance.double().sum(0).cpu()

    def summed_over_ranks(self) -> ImportanceStats:
        """Every rank's counts and sums added (the statistics themselves in one process)."""
        tensors = {**{f"activated.{m}": t for m, t in self.activated.items()}, **{f"total.{m}": t for m, t in self.total.items()},
                   "queries": torch.tensor(self.queries, dtype=torch.int64)}
        summed = all_reduce_sum(tensors)
        return ImportanceStats({m: summed[f"activated.{m}"] for m in self.activated}, {m: summed[f"total.{m}"] for m in self.total},
                               int(summed["queries"]))


class _AttentionRecorder:
    """Hooks that keep one layer's q/k/v projection outputs and rotary (cos, sin)."""

    def __init__(self) -> None:
        self.values: dict[tuple[int, str], torch.Tensor] = {}

    def output_hook(self, layer: int, name: str):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            self.values[(layer, name)] = output.detach()

        return hook

    def rotary_hook(self, layer: int):
        def hook(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
            rotary = kwargs.get("position_embeddings")
            if rotary is not None:
                self.values[(layer, "cos")], self.values[(layer, "sin")] = rotary[0].detach(), rotary[1].detach()

        return hook


def _attention_modules(loaded: LoadedModel) -> list[nn.Module] | None:
    """Each layer's attention module when q/k/v/o are separate projections, else None."""
    blocks = loaded.model.get_submodule(loaded.sites.layers_path)
    if not all(s.q is not None and s.k is not None and s.v is not None and s.o is not None for s in loaded.sites.layers):
        return None
    found = [getattr(block, "self_attn", None) for block in blocks]
    return found if all(m is not None for m in found) else None


@torch.inference_mode()
def batch_importance(loaded: LoadedModel, sequences: list[list[int]], *, attention: bool = True, chunk_elements: int = 1 << 24) -> dict[str, torch.Tensor]:
    """Per-query importance of every neuron: module -> [b, layers, width] (float32)."""
    batch = pad_batch(loaded, sequences)
    shape = tuple(batch.input_ids.shape)
    valid = batch.attention_mask.bool()
    sites = loaded.sites
    ffn = torch.empty(shape[0], sites.num_layers, sites.d_mlp, device=loaded.device)
    down_norms = [down_column_norms(s.down).to(loaded.device) for s in sites.layers]

    def ffn_hook(layer: int, x: torch.Tensor) -> None:
        ffn[:, layer] = (x.float() * valid[..., None]).pow(2).sum(1).sqrt() * down_norms[layer]

    attn_modules = _attention_modules(loaded) if attention else None
    recorder = _AttentionRecorder()
    handles = []
    try:
        if attn_modules is not None:
            for s, module in zip(sites.layers, attn_modules):
                for name in ("q", "k", "v"):
                    handles.append(getattr(s, name).register_forward_hook(recorder.output_hook(s.index, name)))
                handles.append(module.register_forward_pre_hook(recorder.rotary_hook(s.index), with_kwargs=True))
        with on_mlp_inputs(loaded.model, sites, shape, ffn_hook):
            loaded.model(**forward_kwargs(loaded.model, batch))
    finally:
        for handle in handles:
            handle.remove()
    result = {"up_proj": ffn.cpu(), "down_proj": ffn.cpu()}
    if attn_modules is not None:
        result.update(_attention_importance(loaded, recorder.values, valid, chunk_elements))
    return result


def _attention_importance(loaded: LoadedModel, values: dict, valid: torch.Tensor, chunk_elements: int) -> dict[str, torch.Tensor]:
    shape = AttentionShape.of(loaded)
    n_layers, b = loaded.sites.num_layers, valid.shape[0]
    out = {name: torch.empty(b, n_layers, width) for name, width in _attention_widths(shape).items()}
    for s in loaded.sites.layers:
        layer = s.index
        o_norm = s.o.weight.detach().float().norm(dim=0).pow(2)  # [H*d_h]: column norms of W_o
        o_norm = o_norm.view(shape.kv_heads, shape.n_rep, shape.d_head).sum(1).sqrt().flatten()  # [G*d_h]
        for row in range(b):
            keep = valid[row]
            q = values[(layer, "q")][row, keep].float().view(-1, shape.heads, shape.d_head).transpose(0, 1)
            k = values[(layer, "k")][row, keep].float().view(-1, shape.kv_heads, shape.d_head).transpose(0, 1)
            v = values[(layer, "v")][row, keep].float()
            cos = values.get((layer, "cos"))
            sin = values.get((layer, "sin"))
            cos = cos[row if cos.shape[0] > 1 else 0, keep].float() if cos is not None else None
            sin = sin[row if sin.shape[0] > 1 else 0, keep].float() if sin is not None else None
            per_q, per_k = qk_importance(_rotate(q, cos, sin), _rotate(k, cos, sin), shape.n_rep, chunk_elements)
            out["q_proj"][row, layer] = per_q.flatten().cpu()
            out["k_proj"][row, layer] = per_k.flatten().cpu()
            out["v_proj"][row, layer] = (v.pow(2).sum(0).sqrt() * o_norm).cpu()
    return out


def importance_stats(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    attention: bool = True,
    per_query_top: float = 0.05,
    epsilon: float | None = None,
    batch_size: int = 8,
) -> ImportanceStats:
    """Stream importance over the prompts (chat-rendered, prompt tokens only).

    In a torchrun group each rank scores its shard of the batches and every rank gets the sum.
    """
    stats = ImportanceStats.empty(loaded, attention)
    for part in rank_batches(prompts, batch_size, "importance"):
        encoded = [encode_prompt(loaded.tokenizer, p) for p in part]
        for module, importance in batch_importance(loaded, encoded, attention=attention).items():
            stats.add(module, importance, per_query_top, epsilon)
        stats.queries += len(part)
    return stats.summed_over_ranks()


def select_weight_rows(stats: ImportanceStats, loaded: LoadedModel, min_fraction: float, provenance: dict[str, str]) -> WeightRowSet:
    """Neurons activated on at least `min_fraction` of the queries, ranked by mean importance."""
    modules, layers, indices, scores = [], [], [], []
    for code, name in enumerate(MODULES):
        if name not in stats.activated:
            continue
        chosen = stats.activated[name] >= math.ceil(min_fraction * stats.queries - 1e-9)
        layer, index = torch.nonzero(chosen, as_tuple=True)
        modules.append(torch.full_like(layer, code))
        layers.append(layer)
        indices.append(index)
        scores.append((stats.total[name] / stats.queries)[layer, index])
    score = torch.cat(scores).float()
    order = torch.argsort(score, descending=True, stable=True)
    meta = {**model_metadata(loaded), "format": NEURONS_FORMAT, "site": ",".join(MODULES), "queries": str(stats.queries), **provenance}
    return WeightRowSet(*(torch.cat(t)[order].to(torch.int32) for t in (modules, layers, indices)), score[order], meta)


def ffn_neuron_set(stats: ImportanceStats, loaded: LoadedModel, provenance: dict[str, str]) -> NeuronSet:
    """Every MLP neuron ranked by activation frequency, then mean importance (a patchable set)."""
    frequency = stats.activated["down_proj"].double() / stats.queries
    mean = stats.total["down_proj"] / stats.queries
    score = frequency + mean / (mean.max() + 1e-12) * 1e-3  # frequency first, importance breaks ties
    return NeuronSet.from_scores(score.float(), {**model_metadata(loaded), "site": MLP_SITE, "queries": str(stats.queries), **provenance})
