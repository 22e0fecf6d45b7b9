"""Live patching cost: decoding with the aligned twin patching the top-k neurons vs plain decoding.

    python -m bench.bench_patching [--rounds 15] [--max-tokens 64] [--k 205] [--threads 1]

Runs the serving engine (`models.generation.decode`) directly, batch 1, greedy. Patched
decoding runs the patch source only up to its deepest patched layer (its own KV cache) and,
in that layer, computes only the patched neurons of the gated MLP; the same run computing
that layer's whole MLP is printed for comparison. Rounds are interleaved in rotating order
so load from other processes hits every variant alike; ratios are medians of per-round
ratios. Target: ratio <= 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from bench.server_setup import PATCH_K, organism_paths
from neuronguard.models.chat import encode_prompt
from neuronguard.models.generation import PatchSource, SamplingParams, decode, left_pad
from neuronguard.models.loading import load_model
from neuronguard.models.artifact.bundle import load_bundle

PROMPT = "Give me three tips for sleeping well"


def timed(model, batch, params, source: PatchSource | None) -> float:
    start = time.perf_counter()
    for _ in decode(model, batch, params, patch_source=source):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=PATCH_K)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path, aligned_path, bundle_path, what = organism_paths()
    served, aligned = load_model(model_path, "cpu"), load_model(aligned_path, "cpu")
    bundle = load_bundle(bundle_path, served)
    selection = bundle.neurons.top(min(args.k, len(bundle.neurons))).selection()
    batch = left_pad([encode_prompt(served.tokenizer, PROMPT)], served.tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=args.max_tokens)  # no stop tokens: every run decodes the same length
    full_mlp = PatchSource(aligned.model, selection, aligned.sites, selected_mlp=False)  # whole MLP in the deepest layer
    variants = {"plain": None, "patched": PatchSource(aligned.model, selection, aligned.sites), "patched_full_mlp": full_mlp}
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):
        for name in names[round_ % 3 :] + names[: round_ % 3]:  # rotating order, as in bench_engine
            elapsed = timed(served.model, batch, params, variants[name])
            if round_:  # round 0 warms up
                times[name].append(elapsed)
    median = {name: statistics.median(v) for name, v in times.items()}
    paired = {name: statistics.median(a / b for a, b in zip(times[name], times["plain"])) for name in names[1:]}
    print(json.dumps({
        "model": what, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "rounds": args.rounds, "max_tokens": args.max_tokens, "patched_neurons": len(selection),
        "deepest_patched_layer": selection.max_layer, "num_layers": served.sites.num_layers,
        "source_selected_mlp": variants["patched"].deepest is not None,
        "plain_median_s": round(median["plain"], 4), "patched_median_s": round(median["patched"], 4),
        "patched_over_plain": round(paired["patched"], 3),
        "patched_full_mlp_over_plain": round(paired["patched_full_mlp"], 3),
        "ratio_of_medians": {name: round(median[name] / median["plain"], 3) for name in names[1:]},
        "target_ratio": 2.0,
    }, indent=2))


if __name__ == "__main__":
    main()
