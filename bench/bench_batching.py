"""Throughput of guarded continuous batching against one-at-a-time decoding.

    python -m bench.bench_batching                    # the built-in organism, 1 thread, 32 prompts x 32 new tokens
    python -m bench.bench_batching --threads 2 --rounds 5
    python -m bench.bench_batching --shape llama3-8b --device cuda --dtype bfloat16 \
        --prompts 128 --concurrency 1 8 32 128 --serial-prompts 16 --rounds 1   # a GPU host

On the organism the served model is its unaligned twin, the patch source the aligned one, the
readout the bundle's two probes (the server's guard). With `--shape` both are random models
of that shape (`bench.shapes`), the readout reads `--probe-k` random neurons and the source
patches `--patch-fraction` of every layer's neurons; prompts are random token ids of
`--prompt-tokens`. Every variant decodes the same chat-rendered test
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

from bench.bench_engine import random_selection
from bench.shapes import SHAPES, random_model
from neuronguard.models.artifact.bundle import load_bundle
from neuronguard.models.artifact.probe import Probe, probes_readout
from neuronguard.models.chat import encode_prompt
from neuronguard.models.engine import EngineConfig, EngineEvent, EngineRequest, GuardedBatchEngine, TokenEvent
from neuronguard.models.generation import PatchSource, SamplingParams, decode, left_pad
from neuronguard.models.jsonl import read_records
from neuronguard.models.loading import LoadedModel, load_model, resolve_dtype
from neuronguard.models.readout import LinearReadout
from neuronguard.models.sites import resolve_sites

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


def organism_setup(max_prompts: int) -> tuple[LoadedModel, LinearReadout, PatchSource, list[list[int]]]:
    """The built-in organism with its bundle's guard and chat-rendered test prompts."""
    served = load_model(ORGANISM / "unaligned")
    aligned = load_model(ORGANISM / "aligned")
    bundle = load_bundle(ORGANISM / "bundle", served)
    stream_probe = bundle.stream_probe or bundle.probe
    readout = probes_readout(bundle.neurons.top(max(bundle.probe.k, stream_probe.k)).selection(), (bundle.probe, stream_probe))
    source = PatchSource(aligned.model, bundle.neurons.top(bundle.default_patch_k).selection(), aligned.sites)
    rows = read_records(ORGANISM / "data" / "splits" / "test.jsonl", ("prompt",))[:max_prompts]
    return served, readout, source, [encode_prompt(served.tokenizer, row["prompt"]) for row in rows]


def random_setup(shape: str, device: str, dtype: str, n_prompts: int, prompt_tokens: int, probe_k: int,
                 patch_fraction: float) -> tuple[LoadedModel, LinearReadout, PatchSource, list[list[int]]]:
    """Random models of `shape` (served and patch source), a random readout and random prompts."""
    torch_dtype = resolve_dtype(dtype)
    model, twin = random_model(shape, device, torch_dtype, seed=0), random_model(shape, device, torch_dtype, seed=1)
    sites = resolve_sites(model)
    tokenizer = load_model(ORGANISM / "unaligned").tokenizer  # only its pad id is read: prompts are token ids
    served = LoadedModel(model, tokenizer, sites, shape, f"random-{shape}")
    layers, d_mlp = sites.num_layers, sites.d_mlp
    probe = Probe("bench", probe_k, "generated", [0.0] * probe_k, [1.0] * probe_k, torch.randn(probe_k).tolist(), 0.0, 0.5)
    readout = probes_readout(random_selection(layers, d_mlp, probe_k, layers - 1, seed=2), (probe, probe))
    patched = random_selection(layers, d_mlp, round(patch_fraction * layers * d_mlp), layers - 1, seed=3)
    gen = torch.Generator().manual_seed(4)
    vocab = SHAPES[shape].vocab_size
    prompts = [torch.randint(10, vocab, (prompt_tokens,), generator=gen).tolist() for _ in range(n_prompts)]
    return served, readout, PatchSource(twin, patched, resolve_sites(twin)), prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--attention-group-keys", type=int,
                        help="keys per attention group (0: the whole step at once; default: the engine's choice for the device)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random models of this shape instead of the organism")
    parser.add_argument("--device", default="cpu", help="with --shape")
    parser.add_argument("--dtype", default="float32", help="with --shape")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="with --shape: random prompt length")
    parser.add_argument("--probe-k", type=int, default=1500, help="with --shape: neurons the readout reads")
    parser.add_argument("--patch-fraction", type=float, default=0.05, help="with --shape: share of neurons patched")
    parser.add_argument("--serial-prompts", type=int, help="time one-at-a-time decoding on the first N prompts only "
                                                           "(tokens/s and mismatches on those; default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.shape is None:
        served, readout, source, prompts = organism_setup(args.prompts)
    else:
        served, readout, source, prompts = random_setup(args.shape, args.device, args.dtype, args.prompts,
                                                        args.prompt_tokens, args.probe_k, args.patch_fraction)
    serial_prompts = prompts[: args.serial_prompts or len(prompts)]
    params = SamplingParams(max_new_tokens=args.max_tokens)
    tokens = {"serial": len(serial_prompts) * args.max_tokens, "engine": len(prompts) * args.max_tokens}
    longest = max(len(p) for p in prompts) + args.max_tokens
    page = 32
    config = EngineConfig(num_blocks=-(-longest // page) * max(args.concurrency) + 8, page_size=page,
                          max_batch_tokens=args.max_batch_tokens, max_requests_per_batch=max(args.concurrency),
                          attention_group_keys=args.attention_group_keys)
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
                        elapsed, outputs = serial(served, serial_prompts, params, variant, readout, source)
                    reference.setdefault(variant, outputs)
                else:
                    elapsed, outputs = batched(engine, prompts, params, variant, concurrent)
                    if variant in reference:
                        mismatches += sum(a != b for a, b in zip(outputs, reference[variant]))  # the serial prompts
                if round_:  # round 0 warms up
                    times[(kind, variant, concurrent)].append(elapsed)
    finally:
        engine.shutdown()

    def tps(run: tuple[str, str, int]) -> float:
        return round(tokens[run[0]] / statistics.median(times[run]), 1)

    def paired(a: tuple[str, str, int], b: tuple[str, str, int]) -> float:
        """Median over rounds of b's tokens/s over a's: for two runs of the same tokens, a's time over b's."""
        return round(statistics.median((tokens[b[0]] / y) / (tokens[a[0]] / x) for x, y in zip(times[a], times[b])), 3)

    print(json.dumps({
        "model": f"random {args.shape}, {args.dtype}" if args.shape else "organism (unaligned, patch source aligned)",
        "device": (torch.cuda.get_device_name() if served.device.type == "cuda" else f"CPU, {args.threads} threads"),
        "machine": platform.machine(), "prompts": len(prompts), "serial_prompts": len(serial_prompts),
        "new_tokens": args.max_tokens, "attention_group_keys": args.attention_group_keys,
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
