"""Contract: every request in the batching engine equals `models.generation.decode` run alone.

Per request: the same greedy (or same-seed sampled) tokens, readout logits within 1e-4 and
the same guard decisions under the server's hold-back rule, with 8 and 32 requests at once,
stop tokens, chunked prefill, prefix sharing, cancels and patching on a subset. References
are computed before an engine starts: while it runs, the engine owns the models.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.engine import (
    EngineConfig,
    EngineEvent,
    EngineRequest,
    ErrorEvent,
    FinishedEvent,
    GuardedBatchEngine,
    TokenEvent,
)
from neuronguard.models.engine import attention
from neuronguard.models.engine.attention import GROUPED_SDPA, group_bounds
from neuronguard.models.generation import PatchSource, SamplingParams, decode, left_pad
from neuronguard.models.hooks import count_hooks
from neuronguard.models.loading import LoadedModel, load_model
from neuronguard.models.readout import LinearReadout

BUDGET = 10  # released tokens per request; the engine runs BUDGET + 1 steps to score the last one
TOL = 1e-4


@dataclass
class Guard:
    """The server's guard loop over steps: prefill probe on step 0, each token released after its own score."""

    thresholds: tuple[float, float]  # on readout logits: (prefill head 0, stream head 1)
    stops: frozenset[int]
    decisions: list[tuple[str, str]] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    finish: str | None = None
    pending: int | None = None

    def step(self, index: int, token: int, logits: torch.Tensor) -> bool:
        """Feed one step; True when the request ends here."""
        stage, head = ("prefill", 0) if index == 0 else ("stream", 1)
        decision = "block" if float(logits[head]) >= self.thresholds[head] else "allow"
        self.decisions.append((stage, decision))
        if decision == "block":
            self.finish = "content_filter"
            return True
        if self.pending is not None:
            self.released.append(self.pending)
            self.pending = None
        if index == BUDGET:
            self.finish = "length"
            return True
        if token in self.stops:
            self.finish = "stop"
            return True
        self.pending = token
        return False


@dataclass
class Reference:
    tokens: list[int]
    logits: list[torch.Tensor]  # [heads] per step
    stopped: bool  # ended on a stop token


@dataclass
class Setup:
    served: LoadedModel
    twin: LoadedModel
    readout: LinearReadout
    source: PatchSource


def reference(setup: Setup, prompt: list[int], params: SamplingParams, patch: bool) -> Reference:
    tokens, logits, stopped = [], [], False
    steps = decode(setup.served.model, left_pad([prompt], 0), params, sites=setup.served.sites,
                   readout=setup.readout, patch_source=setup.source if patch else None)
    for step in steps:
        tokens.append(int(step.tokens[0]))
        logits.append(step.readout_logits[0].clone())
        if bool(step.finished[0]):
            stopped = True
            break
    return Reference(tokens, logits, stopped)


def truncated(ref: Reference, stop: int) -> Reference:
    """The reference with `stop` as its stop token: greedy decoding ends on its first occurrence."""
    if stop not in ref.tokens:
        return ref
    end = ref.tokens.index(stop) + 1
    return Reference(ref.tokens[:end], ref.logits[:end], True)


def random_prompts(n: int, lengths: tuple[int, int], seed: int, prefix: list[int] | None = None) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=gen).tolist()
    return [(prefix or []) + torch.randint(5, 320, (size,), generator=gen).tolist() for size in sizes]


def threshold_between(values: list[float], quantile: float) -> float:
    """A threshold near `quantile` in a gap of at least 1e-3, so 1e-4 noise cannot flip a decision."""
    ordered = sorted(values)
    start = min(len(ordered) - 2, int(quantile * len(ordered)))
    for i in list(range(start, len(ordered) - 1)) + list(range(start - 1, -1, -1)):
        if ordered[i + 1] - ordered[i] > 1e-3:
            return (ordered[i] + ordered[i + 1]) / 2
    raise AssertionError("no gap for a threshold")


def collect(engine: GuardedBatchEngine, requests: list[EngineRequest], guards: list[Guard] | None = None) -> list[list[EngineEvent]]:
    """Submit all requests at once; a guard's block cancels its request from the engine thread."""
    events: list[list[EngineEvent]] = [[] for _ in requests]
    done = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event: EngineEvent) -> None:
            events[i].append(event)
            if isinstance(event, TokenEvent) and guards is not None and guards[i].step(event.index, event.token, event.readout_logits):
                engine.cancel(event.request_id)
            if not isinstance(event, TokenEvent):
                done.release()
        return sink

    for i, request in enumerate(requests):
        engine.submit(request, sink_for(i))
    for _ in requests:
        assert done.acquire(timeout=60), "a request never finished"
    return events


def tokens_of(events: list[EngineEvent]) -> list[int]:
    return [e.token for e in events if isinstance(e, TokenEvent)]


def assert_matches(events: list[EngineEvent], ref: Reference, guard: Guard | None = None) -> None:
    steps = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.index for e in steps] == list(range(len(steps)))
    assert [e.token for e in steps] == ref.tokens[: len(steps)]
    for event, logits in zip(steps, ref.logits):
        assert event.readout_logits is not None
        torch.testing.assert_close(event.readout_logits, logits, atol=TOL, rtol=0)
    end = events[-1]
    assert isinstance(end, FinishedEvent), end
    if guard is None:
        assert len(steps) == len(ref.tokens)
        assert end.reason == ("stop" if ref.stopped else "length")
    else:
        expected = Guard(guard.thresholds, guard.stops)
        for index, (token, logits) in enumerate(zip(ref.tokens, ref.logits)):
            if expected.step(index, token, logits):
                break
        assert guard.decisions == expected.decisions
        assert guard.released == expected.released and guard.finish == expected.finish
        # A block or a budget end stops the request at the next step: no token after the decision.
        assert len(steps) == len(expected.decisions)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one intra-op thread, also when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def strong_twin_path(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A twin whose MLP activations differ enough from the served model's that patching changes tokens."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(8 * torch.randn(layer.mlp.up_proj.weight.shape[0], 1, generator=gen))
    target = tmp_path_factory.mktemp("strong-twin")
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_llama_path).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def setup(tiny_llama_path: Path, strong_twin_path: Path) -> Setup:
    served, twin = load_model(tiny_llama_path), load_model(strong_twin_path)
    gen = torch.Generator().manual_seed(5)
    layers = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    selection = NeuronSelection(layers, torch.randint(0, 64, (7,), generator=gen))
    readout = LinearReadout(selection, torch.randn(7, 2, generator=gen), torch.randn(2, generator=gen))
    patched = NeuronSelection(torch.arange(3).repeat_interleave(8), torch.cat([torch.randperm(64, generator=gen)[:8] for _ in range(3)]))
    return Setup(served, twin, readout, PatchSource(twin.model, patched, twin.sites))


@pytest.mark.parametrize(("concurrent", "group_keys"), [(8, None), (32, None), (32, 0)])
def test_guarded_requests_match_reference(setup: Setup, concurrent: int, group_keys: int | None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """32 requests attend in groups of requests by default on CPU (up to ~1,600 keys a step), 8 in one group;
    group_keys 0 attends every step at once."""
    groups: list[int] = []

    def counted(cu_seq_lens_k: list[int], keys_per_group: int) -> list[int]:
        bounds = group_bounds(cu_seq_lens_k, keys_per_group)
        groups.append(len(bounds) - 1)
        return bounds

    monkeypatch.setattr(attention, "group_bounds", counted)
    prompts = random_prompts(concurrent, (2, 40), seed=concurrent)
    patch = [i % 3 == 0 for i in range(concurrent)]
    unstopped = [reference(setup, p, SamplingParams(max_new_tokens=BUDGET + 1), patch=flag) for p, flag in zip(prompts, patch)]
    unpatched = [reference(setup, p, SamplingParams(max_new_tokens=BUDGET + 1), patch=False) for p in prompts[:9:3]]
    assert any(r.tokens != u.tokens for r, u in zip(unstopped[::3], unpatched)), "patching changes no token"
    # A token the model often emits early ends some requests; greedy decoding stops right on it.
    stop = Counter(t for r in unstopped for t in r.tokens[1:5]).most_common(1)[0][0]
    params = SamplingParams(max_new_tokens=BUDGET + 1, stop_token_ids=frozenset({stop}))
    refs = [truncated(r, stop) for r in unstopped]
    # Thresholds that block some requests at prefill and some of the others mid-stream.
    prefill = threshold_between([r.logits[0][0].item() for r in refs], 0.8)
    peaks = [max(x[1].item() for x in r.logits[1:]) for r in refs if r.logits[0][0] < prefill and len(r.logits) > 1]
    thresholds = (prefill, threshold_between(peaks, 0.6))
    guards = [Guard(thresholds, params.stop_token_ids) for _ in prompts]
    # 32 prompts prefill in chunks
    config = EngineConfig(num_blocks=128, page_size=16, max_batch_tokens=64, attention_group_keys=group_keys)
    with GuardedBatchEngine(setup.served, readout=setup.readout, patch_source=setup.source, config=config) as engine:
        assert setup.served.model.config._attn_implementation == ("sdpa" if group_keys == 0 else f"{GROUPED_SDPA}_384")
        requests = [EngineRequest(p, params, readout=True, patch=flag) for p, flag in zip(prompts, patch)]
        events = collect(engine, requests, guards)
        assert engine.stats().active_requests == 0
    for request_events, ref, guard in zip(events, refs, guards):
        assert_matches(request_events, ref, guard)
    ends = Counter(g.decisions[-1][0] if g.finish == "content_filter" else g.finish for g in guards)
    assert ends["prefill"] and ends["stream"] and ends["stop"] + ends["length"], ends
    assert count_hooks(setup.served.model) == 0 and count_hooks(setup.twin.model) == 0
    assert setup.served.model.config._attn_implementation == setup.twin.model.config._attn_implementation == "sdpa"
    assert (max(groups, default=0) > 1) == (concurrent == 32 and group_keys is None), Counter(groups)


def test_group_bounds_close_a_group_once_it_holds_enough_keys() -> None:
    assert group_bounds([0, 100, 200, 300, 400, 450], 200) == [0, 2, 4, 5]
    assert group_bounds([0, 100, 150], 384) == [0, 2]  # one group: the dense call
    assert group_bounds([0, 500, 510], 384) == [0, 1, 2]  # a long prefill is a group of its own


def test_chunked_prefill_and_prefix_sharing_match_reference(setup: Setup) -> None:
    shared = random_prompts(1, (40, 40), seed=3)[0]
    prompts = random_prompts(1, (100, 100), seed=4) + random_prompts(6, (3, 9), seed=5, prefix=shared)
    params = SamplingParams(max_new_tokens=8)
    refs = [reference(setup, p, params, patch=False) for p in prompts]
    config = EngineConfig(num_blocks=64, page_size=8, max_batch_tokens=16)
    with GuardedBatchEngine(setup.served, readout=setup.readout, config=config) as engine:
        first = collect(engine, [EngineRequest(prompts[1], params, readout=True)])  # its blocks stay cached
        rest = collect(engine, [EngineRequest(p, params, readout=True) for p in prompts[:1] + prompts[2:]])
        computed = engine.stats().tokens_computed
    for request_events, ref in zip(first + rest, refs[1:2] + refs[:1] + refs[2:]):
        assert_matches(request_events, ref)
    positions = sum(len(p) + len(r.tokens) - 1 for p, r in zip(prompts, refs))
    assert computed <= positions - 5 * 40, "the shared prefix was recomputed"


def test_cancel_stops_one_request_and_spares_the_others(setup: Setup) -> None:
    prompts = random_prompts(8, (2, 20), seed=21)
    params = SamplingParams(max_new_tokens=BUDGET + 1)
    refs = [reference(setup, p, params, patch=i == 2) for i, p in enumerate(prompts)]
    config = EngineConfig(num_blocks=64, page_size=16, max_batch_tokens=64)
    events: list[list[EngineEvent]] = [[] for _ in prompts]
    ended = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event: EngineEvent) -> None:
            events[i].append(event)
            if i == 2 and isinstance(event, TokenEvent) and event.index == 2:
                engine.cancel(event.request_id)  # from the engine thread: before the next step
            if not isinstance(event, TokenEvent):
                ended.release()
        return sink

    with GuardedBatchEngine(setup.served, readout=setup.readout, patch_source=setup.source, config=config) as engine:
        ids = [engine.submit(EngineRequest(p, params, readout=True, patch=i == 2), sink_for(i)).request_id
               for i, p in enumerate(prompts)]
        engine.cancel(ids[5])  # from the client's thread, while it is queued or prefilling
        for _ in prompts:
            assert ended.acquire(timeout=60)
        assert engine.stats().active_requests == 0
    for i, (got, ref) in enumerate(zip(events, refs)):
        steps = tokens_of(got)
        if i in (2, 5):
            assert got[-1] == FinishedEvent(ids[i], "cancelled", len(steps))
            assert steps == ref.tokens[: len(steps)] and len(steps) == 3 if i == 2 else len(steps) < len(ref.tokens)
        else:
            assert_matches(got, ref)


def test_greedy_and_seeded_sampling_share_a_batch(setup: Setup) -> None:
    prompts = random_prompts(8, (2, 20), seed=31)
    params = [SamplingParams(max_new_tokens=12) if i % 2 else SamplingParams(max_new_tokens=12, temperature=0.9,
              top_p=0.9, seed=100 + i // 4) for i in range(8)]  # requests 0 and 2 share a seed
    prompts[2] = prompts[0]
    refs = [reference(setup, p, q, patch=False) for p, q in zip(prompts, params)]
    config = EngineConfig(num_blocks=64, page_size=16, max_batch_tokens=64)
    with GuardedBatchEngine(setup.served, readout=setup.readout, config=config) as engine:
        events = collect(engine, [EngineRequest(p, q, readout=i % 3 == 0) for i, (p, q) in enumerate(zip(prompts, params))])
    for i, (got, ref) in enumerate(zip(events, refs)):
        assert tokens_of(got) == ref.tokens, i
        assert all((e.readout_logits is not None) == (i % 3 == 0) for e in got if isinstance(e, TokenEvent))
    same_seed = [tokens_of(events[i]) for i in (0, 2)]
    greedy = reference(setup, prompts[0], SamplingParams(max_new_tokens=12), patch=False).tokens
    assert same_seed[0] == same_seed[1] and same_seed[0] != greedy


def test_bad_requests_are_refused_and_hooks_leave_with_the_engine(setup: Setup) -> None:
    with GuardedBatchEngine(setup.served, config=EngineConfig(num_blocks=8, page_size=8, max_batch_tokens=16)) as bare:
        for expected, flags in (("readout", {"readout": True}), ("patch source", {"patch": True})):
            with pytest.raises(ValueError, match=expected):
                bare.submit(EngineRequest((5,), SamplingParams(max_new_tokens=4), **flags))
    model = setup.served.model
    attention = model.config._attn_implementation
    bad = {
        "no tokens": EngineRequest((), SamplingParams()),
        "token ids": EngineRequest((5, 320), SamplingParams()),
        "max_new_tokens": EngineRequest((5,), SamplingParams(max_new_tokens=0)),
        "capacity": EngineRequest((5,) * 60, SamplingParams(max_new_tokens=10)),
        "top_p": EngineRequest((5,), SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.0)),
    }
    alone = reference(setup, [5, 6, 7], SamplingParams(max_new_tokens=4), patch=True)
    # The context manager shuts the engine down on errors too: its thread would keep the process alive.
    config = EngineConfig(num_blocks=8, page_size=8, max_batch_tokens=16)
    with GuardedBatchEngine(setup.served, readout=setup.readout, patch_source=setup.source, config=config) as engine:
        assert count_hooks(model) > 0
        with engine.exclusive():  # the loop waits and the engine's hooks stay idle for this caller's decode
            paused = reference(setup, [5, 6, 7], SamplingParams(max_new_tokens=4), patch=True)
        assert paused.tokens == alone.tokens
        torch.testing.assert_close(torch.stack(paused.logits), torch.stack(alone.logits), atol=0, rtol=0)
        for expected, request in bad.items():
            with pytest.raises(ValueError, match=expected):
                engine.submit(request)
        events = list(engine.submit(EngineRequest((5, 6, 7), SamplingParams(max_new_tokens=3))).events(timeout=60))
        engine.shutdown()
    assert len(tokens_of(events)) == 3 and isinstance(events[-1], FinishedEvent)
    assert count_hooks(model) == 0 and model.config._attn_implementation == attention
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(EngineRequest((5,), SamplingParams(max_new_tokens=4)))


def test_a_failing_step_fails_every_request_closed(setup: Setup) -> None:
    """An error inside a step (here: a hook that raises on the fourth step) ends every request with an
    `ErrorEvent`; no request gets a token without its readout, and the engine stops accepting work."""
    prompts = random_prompts(4, (2, 10), seed=41)
    calls = []

    def fail_on_fourth(_module: torch.nn.Module, _args: tuple) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected guard failure")

    config = EngineConfig(num_blocks=32, page_size=16, max_batch_tokens=64)
    with GuardedBatchEngine(setup.served, readout=setup.readout, config=config) as engine:
        handle = setup.served.sites.layers[1].down.register_forward_pre_hook(fail_on_fourth)
        try:
            handles = [engine.submit(EngineRequest(p, SamplingParams(max_new_tokens=20), readout=True)) for p in prompts]
            events = [list(h.events(timeout=60)) for h in handles]
        finally:
            handle.remove()
        assert not engine.running
        with pytest.raises(RuntimeError):
            engine.submit(EngineRequest((5,), SamplingParams(max_new_tokens=2)))
    for got in events:
        assert isinstance(got[-1], ErrorEvent) and "injected guard failure" in got[-1].message
        assert all(e.readout_logits is not None for e in got if isinstance(e, TokenEvent))
        assert len(tokens_of(got)) < 20
    assert count_hooks(setup.served.model) == 0
