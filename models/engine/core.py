"""The guarded batching engine: many requests decode together, each under its own guard policy.

It runs transformers' continuous-batching engine (paged KV cache, chunked prefill, prefix
sharing, cancellation) on the served model, and is the only code that reads that engine's
internals: its resolved config and batch processor (the step's requests, the KV cache), its
output router (replaced, so every output becomes this module's events) and its logits
processor list (replaced by the per-request sampler). The transformers version is checked
exactly, and contract tests compare every request with `models.generation.decode` run alone.

Each request gets what the reference decoder gives one row: one `TokenEvent` per step with
the readout at the row that step read, in the same order, then one `FinishedEvent` (or an
`ErrorEvent`). Events go to a sink called on the engine's thread; a `cancel` issued from a
sink takes effect before the next step.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
import transformers
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import ContinuousBatchingManager, PagedAttentionCache
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList
from transformers.generation.continuous_batching.continuous_api import OutputRouter
from transformers.generation.continuous_batching.model_runner import infer_max_single_request_tokens
from transformers.generation.continuous_batching.requests import FutureRequestState, GenerationOutput
from transformers.generation.logits_process import LogitsProcessorList

from neuronguard.errors import UsageError
from neuronguard.models.engine.attention import CPU_KEYS_PER_GROUP, grouped_attention
from neuronguard.models.engine.sharding import MLPShard
from neuronguard.models.engine.step import Live, Policy, RequestSampler, StepState, Twin, step_hooks
from neuronguard.models.engine.types import (
    EngineConfig,
    EngineEvent,
    EngineRequest,
    EngineStats,
    ErrorEvent,
    FinishedEvent,
    TokenEvent,
)
from neuronguard.models.generation import PatchSource
from neuronguard.models.loading import LoadedModel
from neuronguard.models.readout import LinearReadout

# The engine internals this module reads exist in exactly this release.
TRANSFORMERS_VERSION = "5.23.0"
log = logging.getLogger("neuronguard.engine")


class _Router(OutputRouter):
    """Turns every engine output into this engine's events (no shared queue, no handlers to clean up)."""

    def __init__(self, on_output: Callable[[GenerationOutput], None]) -> None:
        super().__init__()
        self._on_output = on_output

    def deliver(self, output: GenerationOutput) -> None:
        self._on_output(output)

    def deliver_batch(self, outputs: list[GenerationOutput]) -> None:
        for output in outputs:
            self._on_output(output)


class RequestHandle:
    """A submitted request: its id, its events (when no sink was given) and its cancel."""

    def __init__(self, engine: GuardedBatchEngine, request_id: str, events: queue.SimpleQueue | None) -> None:
        self.engine = engine
        self.request_id = request_id
        self._events = events

    def events(self, timeout: float | None = None) -> Iterator[EngineEvent]:
        """Block for this request's events until its `FinishedEvent` or `ErrorEvent`."""
        if self._events is None:
            raise RuntimeError("this request delivers its events to the sink it was submitted with")
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if not isinstance(event, TokenEvent):
                return

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)


class GuardedBatchEngine:
    """Continuous batching of guarded requests on one served model.

    `readout` is the guard's linear readout (probe logits) for requests with `readout=True`;
    `patch_source` the aligned twin for requests with `patch=True`. Build the engine outside
    any forward pass of the model; while it runs it owns both models (run other forward passes
    inside `exclusive()`). Use it as a context manager, or call `shutdown()`: until then its
    thread keeps the process alive.

    On a model loaded with tensor parallelism every rank builds the engine; rank 0 (the
    driver) takes the requests and delivers the events, the other ranks follow it step by step
    (`wait()` until the driver shuts down). A request's policy reaches the followers once, in
    the step where it is first scheduled, so every rank hooks, reads out and samples alike.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        readout: LinearReadout | None = None,
        patch_source: PatchSource | None = None,
        config: EngineConfig = EngineConfig(),
    ) -> None:
        if transformers.__version__ != TRANSFORMERS_VERSION:
            raise UsageError(f"the batching engine needs transformers=={TRANSFORMERS_VERSION}, found {transformers.__version__}: "
                             "install the pinned version or run with --engine serial")
        if patch_source is not None and patch_source.sites.layers[0].down is loaded.sites.layers[0].down:
            raise UsageError("the patch source must be a model instance of its own (load the checkpoint twice)")
        self.loaded = loaded
        self.readout = readout
        self.patch_source = patch_source
        self.config = config
        self._lives: dict[str, Live] = {}
        self._policies: dict[str, Policy | None] = {}  # every request scheduled so far and not yet gone, on every rank
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._closed = False
        self._stack = ExitStack()
        model = loaded.model
        # Graphs would replay without the Python hooks, async batching would run a step ahead of them,
        # and offloading or forking copy only the served model's cache: all stay off.
        cb_config = ContinuousBatchingConfig(
            num_blocks=config.num_blocks, page_size=config.page_size, max_batch_tokens=config.max_batch_tokens,
            max_requests_per_batch=config.max_requests_per_batch, max_blocks_per_request=0,
            allow_block_sharing=config.prefix_sharing and patch_source is None, use_async_batching=False,
            use_cuda_graph=False, scheduler_type=config.scheduler, auto_switch_to_flash=False, cpu_offload_space=0.0)
        generation = GenerationConfig(do_sample=False, num_return_sequences=1, eos_token_id=-1,
                                      pad_token_id=loaded.tokenizer.pad_token_id)
        # Tensors made under inference mode could not be updated by the engine's thread.
        with torch.inference_mode(False):
            self._manager = ContinuousBatchingManager(model, generation, cb_config)
            self._attn_twin: str | None = None
            helper = self._manager.distributed_helper
            self.tensor_parallel_size = helper.tp_size
            self.is_driver = helper.is_tp_driver
            try:
                self._state = StepState()
                self._manager.logit_processor = ContinuousBatchingLogitsProcessorList(
                    LogitsProcessorList([RequestSampler(self._state)]))
                self._manager.output_router = _Router(self._on_output)
                self._manager.warmup()  # creates the batch processor (and its cache) with the two above
                processor = self._manager.batch_processor
                assert processor is not None
                self._processor = processor  # the loop reuses it; `stop` drops the manager's reference
                self._cache: PagedAttentionCache = processor.cache
                self.max_request_tokens = infer_max_single_request_tokens(self._cache)
                twin = self._twin(patch_source) if patch_source is not None else None
                shard = None
                if helper.tp_size > 1:
                    shard = MLPShard.discover(loaded.sites, helper.tp_group, helper.cpu_comm_group)
                    if patch_source is not None:
                        shard.check_same(patch_source.sites or loaded.sites)
                self._stack.enter_context(step_hooks(model, loaded.sites, self._batch, self._step_policies, self._lives,
                                                     readout, twin, self._state, shard))
                # After warm-up: the step inputs were sized for SDPA, so they keep the mask it slices.
                if (keys := self._attention_group_keys()) and model.config._attn_implementation == "sdpa":
                    models = [model] + ([patch_source.model] if patch_source is not None else [])
                    self._stack.enter_context(grouped_attention(models, keys))
                self._manager.start()
            except BaseException:
                self._release()
                raise

    def _twin(self, source: PatchSource) -> Twin:
        """A paged cache for the twin, of the served cache's exact geometry, so the block indices fit both."""
        served = self.loaded.model
        twin_model = source.model
        attn = served.config._attn_implementation
        if twin_model.config._attn_implementation != attn:
            self._attn_twin = twin_model.config._attn_implementation
            twin_model.set_attn_implementation(attn)
        cache = PagedAttentionCache(
            config=twin_model.config.get_text_config(), continuous_batching_config=self._manager.continuous_batching_config,
            device=self._cache.device, distributed_helper=self._manager.distributed_helper, dtype=twin_model.dtype,
            model_supports_logits_to_keep=self._cache_supports_logits_to_keep())
        if cache.cache_tensor.shape != self._cache.cache_tensor.shape or cache.num_blocks != self._cache.num_blocks:
            raise UsageError("the patch source's KV cache does not match the served model's: use a twin of the same architecture")
        return Twin(source, cache)

    def _attention_group_keys(self) -> int:
        keys = self.config.attention_group_keys
        if keys is None:
            return CPU_KEYS_PER_GROUP if torch.device(self._cache.device).type == "cpu" else 0
        return keys

    def _cache_supports_logits_to_keep(self) -> bool:
        supports = getattr(self.loaded.model, "_supports_logits_to_keep", None)
        return callable(supports) and bool(supports())

    def _batch(self) -> list[FutureRequestState]:
        """The requests of the step about to run, in packing order (engine thread)."""
        return self._processor.inputs_and_outputs.requests_in_batch

    def _step_policies(self, requests: Sequence[FutureRequestState]) -> Mapping[str, Policy | None]:
        """The policies of this step's requests (engine thread, every rank in the same step).

        A request scheduled for the first time gets its policy from the driver's record (None
        when it was cancelled before); under tensor parallelism the driver broadcasts these
        new policies to the other ranks. Requests the scheduler no longer holds are forgotten.
        """
        new = [future.state.request_id for future in requests if future.state.request_id not in self._policies]
        if new:
            policies: list[Policy | None] | None = None
            if self.is_driver:
                with self._lock:
                    policies = [live.policy if (live := self._lives.get(rid)) is not None else None for rid in new]
            if self.tensor_parallel_size > 1:  # the requests without their prompts (the engine sent those)
                sent = None if policies is None else [p and replace(p.request, prompt_ids=()) for p in policies]
                received = self._manager.distributed_helper.tp_broadcast_object_from_rank_0(sent)
                if not self.is_driver:
                    policies = [r and Policy(r, self._generator(r)) for r in received]
            assert policies is not None
            self._policies.update(zip(new, policies))
        scheduler = self._processor.scheduler
        held = scheduler.active_requests.keys() | scheduler.waiting_requests.keys()
        in_step = {future.state.request_id for future in requests}
        for rid in [rid for rid in self._policies if rid not in held and rid not in in_step]:
            del self._policies[rid]
        return self._policies

    def _generator(self, request: EngineRequest) -> torch.Generator | None:
        """The request's own sampler state: seeded, identical on every rank (None: greedy, or the process's RNG)."""
        params = request.params
        if params.temperature <= 0 or params.seed is None:
            return None
        return torch.Generator(device=self.loaded.device).manual_seed(params.seed)

    # ------------------------------------------------------------------ requests

    def submit(self, request: EngineRequest, sink: Callable[[EngineEvent], None] | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue a request. Bad requests raise `ValueError` (a 400); a closed engine `RuntimeError`.

        With `sink`, events are pushed to it on the engine thread (keep it short: hand them to
        an event loop with `call_soon_threadsafe`); without, read them from the handle.
        """
        self._validate(request)
        events: queue.SimpleQueue | None = None
        if sink is None:
            events = queue.SimpleQueue()
            sink = events.put
        rid = request_id if request_id is not None else f"ng-{next(self._ids)}"
        params = request.params
        if self.tensor_parallel_size > 1 and params.temperature > 0 and params.seed is None:
            # Every rank samples this request's tokens: they need one seed (the process's own RNG differs per rank).
            request = replace(request, params=replace(params, seed=secrets.randbits(63)))
            params = request.params
        live = Live(rid, Policy(request, self._generator(request)), sink)
        with self._lock:
            if self._closed or not self._manager.is_running():
                raise RuntimeError("the batching engine is not running")
            if rid in self._lives:
                raise ValueError(f"request id '{rid}' is already in flight")
            self._lives[rid] = live
        added = self._manager.add_request(list(request.prompt_ids), request_id=rid, max_new_tokens=params.max_new_tokens,
                                          streaming=True, eos_token_id=sorted(params.stop_token_ids))
        if added is None:
            with self._lock:
                self._lives.pop(rid, None)
            raise RuntimeError("the batching engine is stopping or has failed and accepts no requests")
        return RequestHandle(self, rid, events)

    def _validate(self, request: EngineRequest) -> None:
        params = request.params
        vocab = self.loaded.model.config.get_text_config().vocab_size
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if len(request.prompt_ids) + params.max_new_tokens > self.max_request_tokens:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                             f"exceeds the engine's per-request KV capacity of {self.max_request_tokens} tokens")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if request.readout and self.readout is None:
            raise ValueError("this engine has no guard readout")
        if request.patch and self.patch_source is None:
            raise ValueError("this engine has no patch source")

    def cancel(self, request_id: str) -> None:
        """Stop a request before the next step (blocked, or its client left); it gets a `FinishedEvent`."""
        with self._lock:
            live = self._lives.pop(request_id, None)
            if live is None or live.done:
                return
            live.done = True
            self._manager.cancel_request(request_id)
            self._send(live, FinishedEvent(request_id, "cancelled", live.emitted))

    def _send(self, live: Live, event: EngineEvent) -> None:
        """Hand an event to the request's sink; a sink that fails ends its request, not the engine."""
        try:
            live.sink(event)
        except Exception:
            log.exception("event sink failed: cancelling request %s", live.request_id)
            if not live.done:
                live.done = True
                self._lives.pop(live.request_id, None)
                self._manager.cancel_request(live.request_id)

    def _on_output(self, output: GenerationOutput) -> None:  # engine thread, inside update_batch
        with self._lock:
            live = self._lives.get(output.request_id)
            if live is None or live.done:
                if not output.is_finished():  # cancelled before the engine had queued it: cancel again
                    self._manager.cancel_request(output.request_id)
                return
            if output.error is not None:
                self._finish(live, ErrorEvent(live.request_id, f"generation failed: {output.error}"))
                return
            new = output.generated_tokens[live.emitted:]
            finished = output.is_finished()
            if len(new) != 1 or (live.request.readout and live.readout is None):
                self._finish(live, ErrorEvent(live.request_id, "the guard lost track of this request's steps"))
                self._manager.cancel_request(live.request_id)
                return
            token = int(new[0])
            event = TokenEvent(live.request_id, live.emitted, token, live.readout, finished, live.patched)
            live.emitted += 1
            live.readout, live.patched = None, 0
            self._send(live, event)  # may cancel this request (a block): that ends it here
            if finished and not live.done:
                reason = "stop" if token in live.request.params.stop_token_ids else "length"
                self._finish(live, FinishedEvent(live.request_id, reason, live.emitted))

    def _finish(self, live: Live, event: FinishedEvent | ErrorEvent) -> None:
        live.done = True
        self._lives.pop(live.request_id, None)
        self._send(live, event)

    # ------------------------------------------------------------------ lifecycle

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Pause the batching loop so this thread can run the model (its step hooks stay idle).

        Not under tensor parallelism: a forward pass of one rank alone would wait for the others forever.
        """
        if self.tensor_parallel_size > 1:
            raise RuntimeError("a tensor-parallel engine cannot be paused for a forward pass on one rank")
        with self._manager.pause():
            yield

    @property
    def running(self) -> bool:
        """Taking requests: not shut down, and its loop neither stopping nor gone. A failed step
        marks the loop stopping before its requests hear of the failure, so a client that got that
        error never finds this engine still running."""
        manager = self._manager
        return (not self._closed and manager.is_running()
                and manager.background_thread_status.can_accept_new_requests() is None)

    def wait(self) -> None:
        """Follow the driver's steps until it shuts the engine down (the non-driver ranks' main loop)."""
        if self.is_driver:
            raise RuntimeError("the driver rank takes requests; only the other tensor-parallel ranks wait")
        thread = self._manager._generation_thread
        while thread is not None and thread.is_alive():
            thread.join(timeout=1.0)

    def stats(self) -> EngineStats:
        s = self._state
        usage = 1.0 - self._cache.pool.num_free_sectors / max(1, self._cache.num_sectors)
        return EngineStats(len(self._lives), s.last_batch_requests, s.last_batch_tokens, s.steps, s.tokens_computed, usage)

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the engine. `drain` lets the requests in flight finish (for at most `timeout` seconds);
        the others end with an `ErrorEvent`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._manager.is_running():
                self._manager.stop(block=True, timeout=timeout, hard_stop=not drain)
            if self._manager.is_running():  # the drain timed out
                self._manager.stop(block=True, hard_stop=True)
        finally:
            self._release()
            with self._lock:
                for live in list(self._lives.values()):
                    self._finish(live, ErrorEvent(live.request_id, "the batching engine shut down"))

    def _release(self) -> None:
        """Remove every hook, hand the model its attention back, free the engine's resources."""
        try:
            self._stack.close()
        finally:
            if self._attn_twin is not None and self.patch_source is not None:
                self.patch_source.model.set_attn_implementation(self._attn_twin)
                self._attn_twin = None
            self._manager.destroy()
            if self._manager._original_attn_impl is not None:  # switched by the engine but never started
                self.loaded.model.set_attn_implementation(self._manager._original_attn_impl)
                self._manager._original_attn_impl = None

    def __enter__(self) -> GuardedBatchEngine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        self.shutdown(drain=exc_type is None)
