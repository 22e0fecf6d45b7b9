"""One guarded workload on the batching engine, alone or as a tensor-parallel group; rank 0 writes what happened.

    python -m bench.tensor_parallel --out runs/tp1                           # one process
    torchrun --standalone --nproc-per-node 2 -m bench.tensor_parallel --out runs/tp2 --tensor-parallel

The served model is the unaligned organism, the patch source the aligned one, the readout the
bundle's two probes. The 32 requests are chat-rendered test-split prompts (harmful and
harmless alternately) in four guard variants by index: plain, guarded (readout, blocked by
the probe thresholds), guarded and patched, patched only; every eighth request samples with
its own seed. A guarded request is blocked as the server blocks it: before its first token
when the prefill probe's score reaches its threshold, later when the stream probe's does
(cancelled before the next step). For timing, `--mode plain` runs the same requests
unguarded and `--mode readout` reads every request out on every step without blocking or
patching (the same steps, so the difference is the guard's cost). Rank 0 writes
`result.json`: per request its tokens, readout logits and the step it was blocked at, plus
the wall time and steps of the run, and (tensor-parallel) the seconds the engine waited for
the guard's all-reduce (started at the last probe layer, waited on at the end of the forward)
and the mean time of that all-reduce alone, measured after the run on the same group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuronguard.models.artifact.bundle import load_bundle
from neuronguard.models.artifact.probe import probes_readout
from neuronguard.models.chat import encode_prompt
from neuronguard.models.distributed import exit_process, leaving_group_together
from neuronguard.models.engine import EngineConfig, EngineEvent, EngineRequest, GuardedBatchEngine, TokenEvent
from neuronguard.models.engine.sharding import MLPShard
from neuronguard.models.generation import PatchSource, SamplingParams
from neuronguard.models.jsonl import read_records
from neuronguard.models.loading import load_model

ORGANISM = Path(__file__).resolve().parents[1] / "models" / "organism"
PREFILL_HEAD, STREAM_HEAD = 0, 1
VARIANTS = ("plain", "guarded", "guarded+patched", "patched")


@dataclass
class Record:
    """What one request did: the released tokens, the readout of each step, where it was blocked."""

    variant: str
    tokens: list[int] = field(default_factory=list)
    readouts: list[list[float]] = field(default_factory=list)
    blocked_at: int | None = None
    finish: str | None = None


def workload(n: int, max_new_tokens: int) -> list[tuple[str, str, SamplingParams]]:
    """(prompt, variant, params) of each request, four harmless, four harmful in turn."""
    rows = read_records(ORGANISM / "data" / "splits" / "test.jsonl", ("prompt", "label"))
    harmful = [r["prompt"] for r in rows if r["label"] == "harmful"]
    harmless = [r["prompt"] for r in rows if r["label"] == "harmless"]
    out = []
    for i in range(n):
        prompt = (harmful if i % 8 >= 4 else harmless)[i]
        sampled = i % 8 == 5
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8 if sampled else 0.0, seed=i if sampled else None)
        out.append((prompt, VARIANTS[i % len(VARIANTS)], params))
    return out


def all_reduce_seconds(rows: int, repeats: int = 500) -> float:
    """Mean seconds of the guard's per-step collective: a sum over the group of [rows, 2] float32 logits."""
    import torch.distributed as dist

    total = torch.zeros(rows, len((PREFILL_HEAD, STREAM_HEAD)))
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(total)
    return (time.perf_counter() - start) / repeats


class _TimedWaits:
    """Seconds the engine spends waiting for the guard's all-reduce (what it adds to a step after the overlap)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        start = MLPShard.start_all_reduce
        timer = self

        class Timed:
            def __init__(self, work: object) -> None:
                self.work = work

            def wait(self) -> None:
                begin = time.perf_counter()
                self.work.wait()
                timer.seconds += time.perf_counter() - begin
                timer.count += 1

        MLPShard.start_all_reduce = lambda shard, total: Timed(start(shard, total))  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tp = args.tensor_parallel
    waits = _TimedWaits() if tp else None
    served = load_model(ORGANISM / "unaligned", "cpu", tensor_parallel=tp)
    twin = load_model(ORGANISM / "aligned", "cpu", tensor_parallel=tp)
    bundle = load_bundle(ORGANISM / "bundle", served)
    stream = bundle.stream_probe or bundle.probe
    selection = bundle.neurons.top(max(bundle.probe.k, stream.k)).selection()
    readout = probes_readout(selection, (bundle.probe, stream))
    source = PatchSource(twin.model, bundle.neurons.top(bundle.default_patch_k).selection(), twin.sites, selected_mlp=not tp)
    config = EngineConfig(num_blocks=256, max_batch_tokens=256, prefix_sharing=False)
    thresholds = (bundle.probe.threshold, args.stream_threshold if args.stream_threshold is not None else stream.threshold)
    if args.mode != "mixed":
        thresholds = (math.inf, math.inf)  # scores are recorded, nothing is blocked
    with GuardedBatchEngine(served, readout=readout, patch_source=source, config=config) as engine:
        if not engine.is_driver:
            engine.wait()
            if tp:
                all_reduce_seconds(args.requests)
            return
        requests = workload(args.requests, args.max_new_tokens)
        variants = [{"mixed": variant, "plain": "plain", "readout": "guarded"}[args.mode] for _, variant, _ in requests]
        records = [Record(variant) for variant in variants]
        done = threading.Semaphore(0)

        def sink_for(i: int):
            record = records[i]

            def sink(event: EngineEvent) -> None:
                if isinstance(event, TokenEvent):
                    if event.readout_logits is not None:
                        logits = event.readout_logits.tolist()
                        record.readouts.append(logits)
                        head = PREFILL_HEAD if event.index == 0 else STREAM_HEAD
                        if 1 / (1 + math.exp(-logits[head])) >= thresholds[head]:  # never with an infinite threshold
                            record.blocked_at = event.index
                            engine.cancel(f"req-{i}")  # before the token is released, as the server blocks
                            return
                    record.tokens.append(event.token)
                    return
                record.finish = getattr(event, "reason", None) or f"error: {getattr(event, 'message', '')}"
                done.release()

            return sink

        start = time.perf_counter()
        steps0 = engine.stats().steps
        for i, ((prompt, _, params), variant) in enumerate(zip(requests, variants)):
            request = EngineRequest(tuple(encode_prompt(served.tokenizer, prompt)), params,
                                    readout="guarded" in variant, patch="patched" in variant)
            engine.submit(request, sink_for(i), request_id=f"req-{i}")
        for _ in requests:
            done.acquire()
        wall = time.perf_counter() - start
        steps = engine.stats().steps - steps0
    all_reduce_s = all_reduce_seconds(args.requests) if tp else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({
        "tensor_parallel_size": int(os.environ.get("WORLD_SIZE", "1")) if tp else 1,
        "mode": args.mode, "wall_s": wall, "steps": steps, "all_reduce_s": all_reduce_s,
        "all_reduce_wait_s": waits.seconds if waits is not None else None, "thresholds": thresholds,
        "requests": [record.__dict__ for record in records],
    }, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tensor-parallel", action="store_true", help="shard the model over the torchrun group")
    parser.add_argument("--mode", choices=("mixed", "plain", "readout"), default="mixed",
                        help="mixed guard variants with blocks (default); all plain; all read out, never blocked")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--stream-threshold", type=float, help="stream-probe threshold (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    with leaving_group_together():
        run(parser.parse_args())
    exit_process(0)


if __name__ == "__main__":
    main()
