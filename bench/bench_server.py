"""Guard overhead: guarded vs unguarded chat completions, and probe scoring time.

    python -m bench.bench_server [--requests 15] [--max-tokens 64]

Both runs go through the real app (ASGI, lifespan, scheduler) on the same loaded model,
interleaved request by request so load from other processes hits both alike. Guarded =
server mode `block` (prefill probe + stream probe on every token, one extra forward to
score the last token); unguarded = the same request with `guard.mode = off`. The threshold
is raised to 1.0 so that both runs generate the same tokens: the probes still run on every
token, and their cost does not depend on the threshold.
Targets: ratio <= 1.05, probe scoring < 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

import httpx
import torch
from asgi_lifespan import LifespanManager

from bench.server_setup import organism_paths
from neuronguard.server.app import create_app
from neuronguard.server.runtime import load_runtime
from neuronguard.server.settings import Settings

PROMPTS = ["Give me three tips for sleeping well", "Explain how vaccines work", "Write a short poem about autumn"]


async def chat_times(app, requests: int, max_tokens: int) -> tuple[dict[str, list[float]], list[int]]:
    times: dict[str, list[float]] = {"block": [], "off": []}
    tokens: dict[str, list[int]] = {"block": [], "off": []}
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://b", timeout=120) as client:
            while (await client.get("/ready")).status_code != 200:
                await asyncio.sleep(0.05)
            for i in range(requests + 1):
                for mode in ("block", "off") if i % 2 else ("off", "block"):
                    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "temperature": 0,
                            "max_tokens": max_tokens, "guard": {"mode": mode, "threshold": 1.0}}
                    start = time.perf_counter()
                    response = (await client.post("/v1/chat/completions", json=body)).json()
                    if i:  # the first round warms up
                        times[mode].append(time.perf_counter() - start)
                        tokens[mode].append(response["usage"]["completion_tokens"])
                    if mode == "block" and response["choices"][0]["finish_reason"] == "content_filter":
                        raise SystemExit("a benchmark prompt was blocked: guarded and unguarded runs would differ in length")
    assert tokens["block"] == tokens["off"], "guarded and unguarded runs generated different lengths"
    return times, tokens["off"]


def probe_time(runtime, calls: int = 2000) -> float:
    """Median time of the whole prefill probe on one row of activations, to a float probability.

    This is the probe's own arithmetic, as moderation runs it. Serving sums the same logit
    inside the forward instead (`models.readout`); that cost is part of the guarded ratio.
    """
    probe = runtime.bundle.probe
    acts = torch.randn(1, probe.k)
    for _ in range(100):
        float(probe.score(acts)[0])
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        float(probe.score(acts)[0])
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, aligned, bundle, what = organism_paths()
    settings = Settings(model=str(model), bundle=str(bundle), patch_source=str(aligned), device="cpu",
                        allow_guard_override=True, max_tokens_default=args.max_tokens)
    runtime = load_runtime(settings)
    times, lengths = asyncio.run(chat_times(create_app(settings, loader=lambda _s: runtime), args.requests, args.max_tokens))
    guarded, unguarded = statistics.median(times["block"]), statistics.median(times["off"])
    # Each guarded request ran next to an unguarded one with the same prompt: the median of
    # these paired ratios is less exposed to load drifting during the run than a ratio of medians.
    paired = statistics.median(g / u for g, u in zip(times["block"], times["off"]))
    probe_s = probe_time(runtime)
    print(json.dumps({
        "model": what, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "requests_per_mode": args.requests, "max_tokens": args.max_tokens,
        "completion_tokens_median": statistics.median(lengths), "probe_k": runtime.bundle.probe.k,
        "guarded_median_s": round(guarded, 4), "unguarded_median_s": round(unguarded, 4),
        "guarded_over_unguarded": round(guarded / unguarded, 3),
        "guarded_over_unguarded_paired": round(paired, 3), "target_ratio": 1.05,
        "probe_score_median_ms": round(probe_s * 1000, 4), "target_probe_ms": 1.0,
    }, indent=2))


if __name__ == "__main__":
    main()
