"""Live patching cost: decoding with the aligned twin patching the top-k neurons vs plain decoding.

    python -m bench.bench_patching [--rounds 5] [--max-tokens 64] [--k 205]

Runs the serving engine (`models.generation.decode`) directly, batch 1, greedy. Patched
decoding runs the patch source only up to its deepest patched layer (its own KV cache);
the same run with the source forced to full depth is printed for comparison. Rounds are
interleaved so load from other processes hits every variant alike. Target: ratio <= 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from bench.server_setup import PATCH_K, organism_paths
from models.chat import encode_prompt
from models.generation import PatchSource, SamplingParams, decode, left_pad
from models.hooks import NeuronSelection
from models.loading import load_model
from detector.bundle import load_bundle

PROMPT = "Give me three tips for sleeping well"


def timed(model, batch, params, source: PatchSource | None) -> float:
    start = time.perf_counter()
    for _ in decode(model, batch, params, patch_source=source):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=PATCH_K)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model_path, aligned_path, bundle_path, what = organism_paths()
    served, aligned = load_model(model_path, "cpu"), load_model(aligned_path, "cpu")
    bundle = load_bundle(bundle_path, served)
    selection = bundle.neurons.top(min(args.k, len(bundle.neurons))).selection()
    # The same neurons in the same order, plus one harmless self-copy in the last layer, forces a full-depth source run.
    last = served.sites.num_layers - 1
    full_depth = NeuronSelection(torch.cat([selection.layers, torch.tensor([last])]),
                                 torch.cat([selection.indices, torch.tensor([0])]))
    batch = left_pad([encode_prompt(served.tokenizer, PROMPT)], served.tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=args.max_tokens)  # no stop tokens: every run decodes the same length
    variants = {
        "plain": None,
        "patched": PatchSource(aligned.model, selection, aligned.sites),
        "patched_full_depth_source": PatchSource(aligned.model, full_depth, aligned.sites),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):
        for name, source in variants.items():
            elapsed = timed(served.model, batch, params, source)
            if round_:  # round 0 warms up
                times[name].append(elapsed)
    median = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps({
        "model": what, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "rounds": args.rounds, "max_tokens": args.max_tokens, "patched_neurons": len(selection),
        "deepest_patched_layer": selection.max_layer, "num_layers": served.sites.num_layers,
        "plain_median_s": round(median["plain"], 4), "patched_median_s": round(median["patched"], 4),
        "patched_over_plain": round(median["patched"] / median["plain"], 3),
        "full_depth_source_over_plain": round(median["patched_full_depth_source"] / median["plain"], 3),
        "target_ratio": 2.0,
    }, indent=2))


if __name__ == "__main__":
    main()
