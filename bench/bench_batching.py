"""Throughput of guarded continuous batching against one-at-a-time decoding, on the built-in organism.

    python -m bench.bench_batching                    # 1 thread, 32 prompts x 32 new tokens
    python -m bench.bench_batching --threads 2 --rounds 5

The served model is the unaligned organism, the patch source the aligned one, the readout the
bundle's two probes (the server's guard). Every variant decodes the same chat-rendered test
prompts, greedy and to a fixed length (no stop token), in three guard variants: plain, guarded
(readout on every step) and patched (readout plus live patching of the bundle's patch set).
`decode` runs them one at a time; the engine keeps 1, 8 or 32 requests in flight (a finished
request is replaced at once, like closed-loop clients). Rounds interleave everything in a
rotating order; the figures are medians, and the ratios are medians of per-round ratios.
Greedy tokens are compared with the one-at-a-time run and mismatches counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from neuronguard.models.artifact.bundle import load_bundle
from neuronguard.models.artifact.probe import probes_readout
from neuronguard.models.chat import encode_prompt
from neuronguard.models.engine import EngineConfig, EngineEvent, EngineRequest, GuardedBatchEngine, TokenEvent
from neuronguard.models.generation import PatchSource, SamplingParams, decode, left_pad
from neuronguard.models.jsonl import read_records
from neuronguard.models.loading import LoadedModel, load_model
from neuronguard.models.readout import LinearReadout

ORGANISM = Path(__file__).resolve().parents[1] / "models" / "organism"
VARIANTS = ("plain", "guarded", "patched")
STREAM_HEAD = 1  # the readout's heads: the bundle's prefill probe, then its stream probe


def serial(loaded: LoadedModel, prompts: list[list[int]], params: SamplingParams, variant: str,
           readout: LinearReadout, source: PatchSource) -> tuple[float, list[list[int]]]:
    """Seconds for `decode` to run every prompt alone, and the tokens it chose."""
    outputs = []
    start = time.perf_counter()
    for prompt in prompts:
        tokens = []
        for step in decode(loaded.model, left_pad([prompt], 0, loaded.device), params, sites=loaded.sites,
                           readout=readout if variant != "plain" else None,
                           patch_source=source if variant == "patched" else None):
            if step.readout_logits is not None:
                float(step.readout_logits[0, STREAM_HEAD])  # the server reads every step's score
            tokens.append(int(step.tokens[0]))
        outputs.append(tokens)
    return time.perf_counter() - start, outputs


def batched(engine: GuardedBatchEngine, prompts: list[list[int]], params: SamplingParams, variant: str,
            concurrent: int) -> tuple[float, list[list[int]]]:
    """Seconds for the engine to run every prompt with `concurrent` requests in flight, and the tokens."""
    outputs: list[list[int]] = [[] for _ in prompts]
    slots = threading.Semaphore(concurrent)
    finished = threading.Semaphore(0)

    def sink_for(i: int) -> Callable[[EngineEvent], None]:
        def sink(event: EngineEvent) -> None:
            if isinstance(event, TokenEvent):
                if event.readout_logits is not None:
                    float(event.readout_logits[STREAM_HEAD])
                outputs[i].append(event.token)
            else:
                slots.release()
                finished.release()
        return sink

    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        slots.acquire()
        engine.submit(EngineRequest(prompt, params, readout=variant != "plain", patch=variant == "patched"), sink_for(i))
    for _ in prompts:
        if not finished.acquire(timeout=600):
            raise RuntimeError("a request did not finish")
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    served = load_model(ORGANISM / "unaligned")
    aligned = load_model(ORGANISM / "aligned")
    bundle = load_bundle(ORGANISM / "bundle", served)
    stream_probe = bundle.stream_probe or bundle.probe
    readout = probes_readout(bundle.neurons.top(max(bundle.probe.k, stream_probe.k)).selection(), (bundle.probe, stream_probe))
    source = PatchSource(aligned.model, bundle.neurons.top(bundle.default_patch_k).selection(), aligned.sites)
    rows = read_records(ORGANISM / "data" / "splits" / "test.jsonl", ("prompt",))[: args.prompts]
    prompts = [encode_prompt(served.tokenizer, row["prompt"]) for row in rows]
    params = SamplingParams(max_new_tokens=args.max_tokens)
    tokens_total = len(prompts) * args.max_tokens
    longest = max(len(p) for p in prompts) + args.max_tokens
    page = 32
    config = EngineConfig(num_blocks=-(-longest // page) * max(args.concurrency) + 8, page_size=page,
                          max_batch_tokens=args.max_batch_tokens, max_requests_per_batch=max(args.concurrency))
    # One engine for every variant (it has the patch source, so prefix sharing is off for all alike).
    engine = GuardedBatchEngine(served, readout=readout, patch_source=source, config=config)
    runs = [("serial", v, 1) for v in VARIANTS] + [("engine", v, c) for c in args.concurrency for v in VARIANTS]
    times: dict[tuple[str, str, int], list[float]] = {run: [] for run in runs}
    reference: dict[str, list[list[int]]] = {}
    mismatches = 0
    try:
        for round_ in range(args.rounds + 1):
            for kind, variant, concurrent in runs[round_ % len(runs):] + runs[: round_ % len(runs)]:
                if kind == "serial":
                    with engine.exclusive():  # the engine's loop waits; its hooks stay idle
                        elapsed, outputs = serial(served, prompts, params, variant, readout, source)
                    reference.setdefault(variant, outputs)
                else:
                    elapsed, outputs = batched(engine, prompts, params, variant, concurrent)
                    if variant in reference:
                        mismatches += sum(a != b for a, b in zip(outputs, reference[variant]))
                if round_:  # round 0 warms up
                    times[(kind, variant, concurrent)].append(elapsed)
    finally:
        engine.shutdown()

    def tps(run: tuple[str, str, int]) -> float:
        return round(tokens_total / statistics.median(times[run]), 1)

    def paired(a: tuple[str, str, int], b: tuple[str, str, int]) -> float:
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)

    print(json.dumps({
        "model": "organism (unaligned, patch source aligned)", "device": f"CPU, {args.threads} threads",
        "machine": platform.machine(), "prompts": len(prompts), "new_tokens": args.max_tokens,
        "rounds": args.rounds, "probe_k": len(readout.selection), "patched_neurons": len(source.selection),
        "serial_tokens_per_s": {v: tps(("serial", v, 1)) for v in VARIANTS},
        "engine_tokens_per_s": {str(c): {v: tps(("engine", v, c)) for v in VARIANTS} for c in args.concurrency},
        "engine_over_serial_throughput": {str(c): {v: paired(("serial", v, 1), ("engine", v, c)) for v in VARIANTS}
                                          for c in args.concurrency},
        "engine_time_over_plain": {str(c): {v: paired(("engine", v, c), ("engine", "plain", c)) for v in VARIANTS[1:]}
                                   for c in args.concurrency},
        "greedy_mismatches_vs_serial": mismatches,
    }, indent=2))


if __name__ == "__main__":
    main()
