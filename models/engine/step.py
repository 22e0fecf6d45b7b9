"""The guard inside each continuous-batching step: readout, live patching and sampling, keyed by request.

A step packs every scheduled position of every request into one sequence, so the MLP sees
[1, T_total, d_mlp]. A pre-hook on the served model maps the step's requests (in the
engine's packing order) to packed rows before any layer runs: each request's span, and for
the requests that get a token this step their last row (the one whose logits are sampled).
The down-projection hooks then read out or overwrite only those rows: no activation leaves
the device except the [n, heads] readout once per step.

Under tensor parallelism every rank runs these hooks on its slice of the neurons
(`models.engine.sharding`); what decides a request's rows is its `Policy`, which every rank
holds identically, so all ranks patch, read out and sample the same rows in every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.generation.continuous_batching.requests import FutureRequestState

from neuronguard.models.generation import PatchSource, sample
from neuronguard.models.hooks import registered
from neuronguard.models.readout import LinearReadout
from neuronguard.models.sites import NeuronSites, resolve_sites
from neuronguard.models.truncated_forward import StopForward, capture_until_deepest, run_until_stop
from neuronguard.models.engine.sharding import MLPShard
from neuronguard.models.engine.types import EngineRequest, EngineEvent


@dataclass(eq=False)
class Policy:
    """What decides a request's rows in every step: its guard flags and its sampler (one per rank)."""

    request: EngineRequest
    generator: torch.Generator | None


Policies = Callable[[Sequence[FutureRequestState]], Mapping[str, "Policy | None"]]


@dataclass(eq=False)
class Live:
    """The engine's record of one request it delivers events for; hooks fill `readout` and `patched`."""

    request_id: str
    policy: Policy
    sink: Callable[[EngineEvent], None]
    emitted: int = 0
    readout: torch.Tensor | None = None  # [heads] of the latest step, until its token is emitted
    patched: int = 0  # positions patched since the last event
    done: bool = False

    @property
    def request(self) -> EngineRequest:
        return self.policy.request


@dataclass(frozen=True)
class Twin:
    """The patch source with a paged cache of its own, fed the served model's block indices.

    It runs on the steps that hold a patched request, on all of the step's rows (a packed
    forward cannot skip any), so every patched request's KV is complete in both caches.
    """

    source: PatchSource
    cache: PagedAttentionCache


@dataclass(eq=False)
class StepPlan:
    """Which packed rows the hooks touch in the current step."""

    new_token: list[Policy | None]  # in logits order: one entry per request that gets a token (padding slots follow)
    readout_ids: list[str]
    readout_rows: torch.Tensor | None  # [n] long, the last row of each readout request with a token
    patch_rows: torch.Tensor | None  # [m] long, every row of the patched requests
    twin_values: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, T, k_layer]
    total: torch.Tensor | None = None  # [n, heads] running readout sum
    layers_seen: int = 0
    reduction: dist.Work | None = None  # tensor parallelism: the ranks' sum of `total`, in flight


@dataclass(eq=False)
class StepState:
    plan: StepPlan | None = None
    steps: int = 0
    tokens_computed: int = 0
    last_batch_requests: int = 0
    last_batch_tokens: int = 0


def _rows(values: list[int], device: torch.device) -> torch.Tensor | None:
    return torch.tensor(values, dtype=torch.long, device=device) if values else None


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # [T_total, d_mlp]: the batch dimension of a packed step is 1


@contextmanager
def step_hooks(
    model: nn.Module,
    sites: NeuronSites,
    batch: Callable[[], Sequence[FutureRequestState]],
    policies: Policies,
    lives: dict[str, Live],
    readout: LinearReadout | None,
    twin: Twin | None,
    state: StepState,
    shard: MLPShard | None = None,
) -> Iterator[StepState]:
    """Install the per-step hooks on the served model until exit (the twin is hooked per step).

    `batch()` returns the step's requests in packing order and `policies(requests)` their
    policies (None for a request the engine knows nothing of); `lives` receive the readout.
    With `shard`, the hooks work on this tensor-parallel rank's slice of the neurons. Forward
    calls that are not engine steps (no paged cache in their kwargs) run with every hook idle.
    """
    handles: list[RemovableHandle] = []
    device = sites.layers[0].down.weight.device
    twin_local = shard.indices(twin.source.selection) if shard is not None and twin is not None else None
    twin_sites = (twin.source.sites or resolve_sites(twin.source.model)) if twin is not None else None

    def begin(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        state.plan = None
        if not isinstance(kwargs.get("cache"), PagedAttentionCache):
            return
        requests = batch()
        table = policies(requests)
        new_token: list[Policy | None] = []
        readout_ids: list[str] = []
        readout_rows: list[int] = []
        patch_rows: list[int] = []
        offset = 0
        for future in requests:
            rid = future.state.request_id
            policy = table.get(rid)
            end = offset + future.query_length
            if policy is not None and policy.request.patch:
                patch_rows.extend(range(offset, end))
                if (live := lives.get(rid)) is not None:
                    live.patched += future.query_length
            if future.has_new_token:
                new_token.append(policy)
                if policy is not None and policy.request.readout:
                    readout_ids.append(rid)
                    readout_rows.append(end - 1)
            offset = end
        # The engine packs requests in this order, one logits slot per request: check it still does.
        if offset != kwargs["input_ids"].shape[-1] or len(requests) != kwargs["logits_indices"].shape[0]:
            raise RuntimeError("the batching engine packed a step differently than its adapter expects")
        state.steps += 1
        state.tokens_computed += offset
        state.last_batch_requests, state.last_batch_tokens = len(requests), offset
        plan = StepPlan(new_token, readout_ids, _rows(readout_rows, device), _rows(patch_rows, device))
        if twin is not None and plan.patch_rows is not None:
            twin_kwargs = {k: v for k, v in kwargs.items() if k != "logits_to_keep"}
            twin_kwargs["cache"] = twin.cache
            source = twin.source
            # Hooked for this pass only: between steps the twin is free for other callers.
            if twin_local is not None:
                assert twin_sites is not None
                with _capture_owned(twin_sites, twin_local) as values:
                    run_until_stop(source.model, **twin_kwargs)
                plan.twin_values = values
            else:
                with capture_until_deepest(source.model, source.selection, sites=source.sites, deepest=source.deepest) as cap:
                    run_until_stop(source.model, **twin_kwargs)
                plan.twin_values = cap.latest_by_layer()
        state.plan = plan

    def end(_module: nn.Module, _args: tuple, _kwargs: dict, _output: object) -> None:
        plan = state.plan
        if plan is None or plan.total is None or readout is None:
            return
        if plan.layers_seen != len(readout.selection.groups):
            raise RuntimeError("the readout did not see every selected layer in this step")
        if plan.reduction is not None:
            plan.reduction.wait()
        logits = plan.total.cpu()  # [n, heads]: the step's one transfer to the host
        for row, rid in enumerate(plan.readout_ids):
            if (live := lives.get(rid)) is not None:
                live.readout = logits[row]

    def readout_hook(weight: torch.Tensor, bias: torch.Tensor, first: bool) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            plan = state.plan
            if plan is None or plan.readout_rows is None:
                return
            picked = _flat(args[0]).index_select(0, plan.readout_rows)  # [n, d_mlp]
            if picked.dtype != torch.float32:
                picked = picked.float()
            if first:
                plan.total, plan.layers_seen = torch.addmm(bias, picked, weight), 1
            else:
                assert plan.total is not None
                plan.total.addmm_(picked, weight)
                plan.layers_seen += 1
            if shard is not None and plan.layers_seen == layers:
                # Each rank summed its own neurons' share: add the ranks' sums while the rest of the forward runs.
                plan.reduction = shard.start_all_reduce(plan.total)

        return hook

    def patch_hook(layer: int, idx: torch.Tensor) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            plan = state.plan
            if plan is None or plan.patch_rows is None:
                return None
            x = args[0]
            flat = _flat(x)
            values = _flat(plan.twin_values[layer]).index_select(0, plan.patch_rows).to(flat.dtype)  # [m, k_layer]
            patched = flat.clone()
            patched.index_put_((plan.patch_rows[:, None], idx[None, :]), values)
            return (patched.view(x.shape), *args[1:])

        return hook

    with registered(handles):
        handles.append(model.register_forward_pre_hook(begin, with_kwargs=True))
        # Readout hooks go first: at a patched layer the readout sees the model's own activations.
        if readout is not None:
            readout.selection.validate(sites)
            layers = len(readout.selection.groups)
            d_mlp = {layer: sites.layers[layer].d_mlp for layer in readout.selection.groups}
            dense = readout.dense(device, d_mlp)
            if shard is not None:
                dense = shard.readout(dense)
            first = min(readout.selection.groups)
            for layer in readout.selection.groups:
                weight, bias = dense[layer]
                handles.append(sites.layers[layer].down.register_forward_pre_hook(readout_hook(weight, bias, layer == first)))
        if twin is not None:
            selection = twin.source.selection
            selection.validate(sites)
            owned = twin_local if twin_local is not None else {layer: idx for layer, (_, idx) in selection.groups.items()}
            for layer, idx in owned.items():
                if idx.numel():
                    handles.append(sites.layers[layer].down.register_forward_pre_hook(patch_hook(layer, idx.to(device))))
        handles.append(model.register_forward_hook(end, with_kwargs=True))
        yield state


@contextmanager
def _capture_owned(sites: NeuronSites, owned: dict[int, torch.Tensor]) -> Iterator[dict[int, torch.Tensor]]:
    """The twin's owned neurons at every patched layer ([1, T, k_owned], possibly empty); the pass
    stops at the deepest patched layer on every rank alike, so the twin's collectives match."""
    device = sites.layers[0].down.weight.device
    deepest = max(owned)
    values: dict[int, torch.Tensor] = {}
    handles: list[RemovableHandle] = []

    def grab(layer: int, idx: torch.Tensor) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            values[layer] = args[0].index_select(-1, idx)
            if layer == deepest:
                raise StopForward

        return hook

    with registered(handles):
        for layer, idx in owned.items():
            handles.append(sites.layers[layer].down.register_forward_pre_hook(grab(layer, idx.to(device))))
        yield values


class RequestSampler:
    """Per-request sampling inside the engine's greedy step: temperature, top-p and a seed per request.

    The engine runs with argmax sampling; for each request that samples, this processor draws
    the token with the reference decoder's sampler and that request's own generator, then
    leaves only that token selectable. Greedy rows pass through untouched.
    """

    supports_continuous_batching = True

    def __init__(self, state: StepState) -> None:
        self.state = state

    def __call__(self, _input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores: [n, vocab] float32
        plan = self.state.plan
        if plan is None:
            return scores
        out = scores
        for row, policy in enumerate(plan.new_token):
            if policy is None or policy.request.params.temperature <= 0:
                continue
            token = sample(scores[row : row + 1], policy.request.params, policy.generator)
            if out is scores:
                out = scores.clone()
            out[row].fill_(float("-inf"))
            out[row, token] = 0.0
        return out
