"""Contrasting memory does not grow with the corpus (peak RSS, 50 vs 400 prompts), and its
teacher-forced pass costs little more than the two plain forwards it needs.

    python -m bench.bench_contrasting [--small 50] [--large 400] [--max-new-tokens 16]

Each size runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own. The
throughput part times `contrast_batch` (both twins teacher-forced, squared differences
accumulated) against the same two forward passes without hooks, on the same sequences.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from bench.bench_importance import ORGANISM, default_pair
import torch

from neuronguard.detector.contrasting import contrast, contrast_batch
from neuronguard.detector.forward import pad_batch
from neuronguard.models.batching import forward_kwargs
from neuronguard.models.prompts import read_prompts
from neuronguard.models.chat import encode_prompt
from neuronguard.models.generation import SamplingParams, generate_ids


def _prompts(n: int, pool_size: int) -> list[str]:
    """n prompts cycling over the same `pool_size` harmful dev prompts: batch shapes repeat, only the corpus grows."""
    split = ORGANISM / "data" / "splits" / "dev.jsonl"
    pool = read_prompts(split, label="harmful")[0][:pool_size] if split.is_file() else [f"Tell me about topic {i}" for i in range(pool_size)]
    return [pool[i % len(pool)] for i in range(n)]


def child(n: int, pool_size: int, max_new_tokens: int) -> None:
    aligned, unaligned = default_pair()
    prompts = _prompts(n, pool_size)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    stats = contrast(aligned, unaligned, prompts, max_new_tokens=max_new_tokens, batch_size=16)
    print(json.dumps({"prompts": n, "tokens": stats.count, "seconds": time.perf_counter() - start,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_load_mib": rss_loaded / 1024}))


@torch.inference_mode()
def throughput(pool_size: int, max_new_tokens: int, rounds: int = 3) -> dict[str, float]:
    """Teacher-forced contrasting vs two plain forwards over the same prompt+completion batches."""
    aligned, unaligned = default_pair()
    batches = []
    for start in range(0, pool_size, 16):
        encoded = [encode_prompt(unaligned.tokenizer, p) for p in _prompts(pool_size, pool_size)[start : start + 16]]
        completions = generate_ids(unaligned.model, pad_batch(unaligned, encoded), SamplingParams(max_new_tokens=max_new_tokens))
        sequences = [p + c for p, c in zip(encoded, completions)]
        batches.append((sequences, pad_batch(unaligned, sequences).attention_mask.bool()))
    tokens = sum(int(mask.sum()) for _, mask in batches)
    timings: dict[str, list[float]] = {"contrasting": [], "plain": []}
    for _ in range(rounds):
        start = time.perf_counter()
        for sequences, mask in batches:
            contrast_batch(aligned, unaligned, sequences, mask)
        timings["contrasting"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for sequences, _ in batches:
            batch = pad_batch(unaligned, sequences)
            aligned.model(**forward_kwargs(aligned.model, batch))
            unaligned.model(**forward_kwargs(unaligned.model, batch))
        timings["plain"].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in timings.items()}
    return {"tokens": tokens, "contrasting_tokens_per_s": tokens / best["contrasting"],
            "two_plain_forwards_tokens_per_s": tokens / best["plain"], "ratio": best["contrasting"] / best["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--large", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.small, args.max_new_tokens)
        return
    results = []
    for n in (args.small, args.large):
        run = subprocess.run([sys.executable, "-m", "bench.bench_contrasting", "--child", str(n), "--small", str(args.small), "--max-new-tokens", str(args.max_new_tokens)],
                             check=True, capture_output=True, text=True)
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    small, large = results
    for r in results:
        print(f"{r['prompts']:>4} prompts, {r['tokens']:>6} completion tokens: peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(after loading {r['rss_after_load_mib']:.0f} MiB), {r['seconds']:.1f} s")
    print(f"tokens ratio {large['tokens'] / small['tokens']:.1f}x, peak RSS ratio {large['peak_rss_mib'] / small['peak_rss_mib']:.3f}x, "
          f"growth above model loading {(large['peak_rss_mib'] - large['rss_after_load_mib']) - (small['peak_rss_mib'] - small['rss_after_load_mib']):+.0f} MiB")
    speed = throughput(args.small, args.max_new_tokens)
    print(f"throughput over {speed['tokens']} tokens (all positions): contrasting {speed['contrasting_tokens_per_s']:.0f} tok/s, "
          f"two plain forwards {speed['two_plain_forwards_tokens_per_s']:.0f} tok/s, contrasting/plain time {speed['ratio']:.3f}x")


if __name__ == "__main__":
    main()
