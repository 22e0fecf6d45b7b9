"""Engine-level guard and patching cost on a random model of a named shape (CPU or GPU).

    python -m bench.bench_engine --shape organism --device cpu
    python -m bench.bench_engine --shape llama3-8b --device cuda --dtype bfloat16 --batch 8

Times `models.generation.decode` (greedy, fixed length, KV cache) in three variants,
interleaved round by round in rotating order: plain; guarded (the server's readout of two
probes over k neurons, summed inside every step's forward, then scored); live-patched (a
patch source of the same shape overwrites the top 5% of neurons each step, running only
up to the deepest patched layer). Prints the ratios of this one run. Values are random, so
only the cost is measured, never efficacy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from bench.shapes import SHAPES, random_model
from neuronguard.models.artifact.probe import Probe, probes_readout
from neuronguard.models.generation import Batch, PatchSource, SamplingParams, decode
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.loading import resolve_dtype
from neuronguard.models.sites import resolve_sites
from neuronguard.server.runtime import STREAM_HEAD


def random_selection(num_layers: int, d_mlp: int, k: int, deepest: int, seed: int) -> NeuronSelection:
    """k neurons spread evenly over layers 0..deepest, distinct within each layer."""
    gen = torch.Generator().manual_seed(seed)
    layers = torch.arange(k) % (deepest + 1)
    indices = torch.empty(k, dtype=torch.long)
    for layer in range(deepest + 1):
        chosen = layers == layer
        indices[chosen] = torch.randperm(d_mlp, generator=gen)[: int(chosen.sum())]
    return NeuronSelection(layers, indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="organism")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--probe-k", type=int, default=1500)
    parser.add_argument("--patch-fraction", type=float, default=0.05)
    parser.add_argument("--deepest-layer", type=int, help="deepest patched layer (default: the last)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (CPU; default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    served = random_model(args.shape, args.device, dtype, seed=0)
    source = random_model(args.shape, args.device, dtype, seed=1)
    sites = resolve_sites(served)
    n_layers, d_mlp = sites.num_layers, sites.d_mlp
    probe_sel = random_selection(n_layers, d_mlp, args.probe_k, n_layers - 1, seed=2)
    probe = Probe("bench", args.probe_k, "generated", [0.0] * args.probe_k, [1.0] * args.probe_k,
                  torch.randn(args.probe_k).tolist(), 0.0, 0.5)
    readout = probes_readout(probe_sel, (probe, probe))  # the server's two heads (prefill, stream)
    deepest = n_layers - 1 if args.deepest_layer is None else args.deepest_layer
    patch_sel = random_selection(n_layers, d_mlp, round(args.patch_fraction * n_layers * d_mlp), deepest, seed=3)
    patch_source = PatchSource(source, patch_sel)
    ids = torch.randint(10, SHAPES[args.shape].vocab_size, (args.batch, args.prompt_tokens), device=args.device)
    batch = Batch(ids, torch.ones_like(ids))
    params = SamplingParams(max_new_tokens=args.max_tokens)

    def run(variant: str) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        if variant == "guarded":
            for step in decode(served, batch, params, sites=sites, readout=readout):
                probe.score_logit(float(step.readout_logits[0, STREAM_HEAD]))  # the server scores every step
        else:
            for step in decode(served, batch, params, sites=sites,
                               patch_source=patch_source if variant == "patched" else None):
                step.tokens.tolist()  # the server reads the tokens every step
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    variants = ("plain", "guarded", "patched")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.rounds + 1):
        # The order rotates every round: each variant runs first, second and third equally
        # often, so a cost that depends on what ran just before (caches) hits all alike.
        for variant in variants[round_ % 3 :] + variants[: round_ % 3]:
            elapsed = run(variant)
            if round_:  # round 0 warms up
                times[variant].append(elapsed)
    median = {v: statistics.median(t) for v, t in times.items()}
    # Variants run back to back within a round, so per-round ratios cancel load that drifts
    # between rounds; their median is the headline figure (use a multiple of 3 rounds).
    paired = {v: statistics.median(a / b for a, b in zip(times[v], times["plain"])) for v in ("guarded", "patched")}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(json.dumps({
        "shape": args.shape, "device": device, "machine": platform.machine(), "dtype": args.dtype,
        "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.max_tokens,
        "probe_k": args.probe_k, "patched_neurons": len(patch_sel), "deepest_patched_layer": deepest,
        "source_selected_mlp": patch_source.deepest is not None,
        "plain_median_s": round(median["plain"], 4),
        "tokens_per_s_plain": round(args.batch * args.max_tokens / median["plain"], 1),
        "guarded_over_plain": round(paired["guarded"], 3),
        "patched_over_plain": round(paired["patched"], 3),
        "ratio_of_medians": {v: round(median[v] / median["plain"], 3) for v in ("guarded", "patched")},
        "targets": {"guarded_over_plain": 1.05, "patched_over_plain": 2.0},
    }, indent=2))


if __name__ == "__main__":
    main()
