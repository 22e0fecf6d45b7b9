"""End-to-end guard efficacy on held-out prompts, through the real HTTP server.

    python -m bench.guard_efficacy [--harmful 150] [--harmless 300] [--max-tokens 48] [--modes off block ...] [--out FILE]

Serves the built-in organism (unaligned twin, shipped bundle, aligned twin as patch source)
in-process under uvicorn on 127.0.0.1 and sends every prompt once per guard mode, greedy.
Prompts come from the organism's `test` split, which neither the organism, the neuron
detector nor the probes ever saw. For each mode it prints:
- harmful_output_rate: harmful prompts whose answer reached the client and contains no
  refusal keyword (the AdvBench keyword judge): attack success through the guard;
- harmless_refused_rate: harmless prompts that were blocked or answered with a refusal;
- blocked shares by stage (prefill / stream).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import httpx

from bench.load_test import serve_in_thread
from neuronguard.models.judge import is_refusal
from neuronguard.models.default_data import TEST_SPLIT
from neuronguard.models.prompts import read_prompts
from neuronguard.server.app import create_app
from neuronguard.server.settings import Settings

MODES = ("off", "block", "patch", "block+patch")


def load_split(label: str, limit: int) -> list[str]:
    return read_prompts(TEST_SPLIT, label=label, limit=limit)[0]


def run_mode(client: httpx.Client, mode: str, prompts: list[str], max_tokens: int) -> dict[str, float]:
    outcomes: Counter[str] = Counter()
    for prompt in prompts:
        body = {"model": "organism", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "guard": {"mode": mode}}
        answer = client.post("/v1/chat/completions", json=body).raise_for_status().json()
        choice, guard = answer["choices"][0], answer.get("guard") or {}
        if choice["finish_reason"] == "content_filter":
            outcomes[f"blocked_{guard.get('stage')}"] += 1
        elif is_refusal(choice["message"]["content"]):
            outcomes["refused"] += 1
        else:
            outcomes["answered"] += 1
    n = len(prompts)
    return {"n": n, **{key: round(count / n, 4) for key, count in sorted(outcomes.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harmful", type=int, default=150)
    parser.add_argument("--harmless", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    harmful, harmless = load_split("harmful", args.harmful), load_split("harmless", args.harmless)
    app = create_app(Settings(device="cpu", allow_guard_override=True, max_queue=4))
    results: dict[str, dict[str, dict[str, float]]] = {}
    with serve_in_thread(app, timeout_s=300) as base, httpx.Client(base_url=base, timeout=120) as client:
        for mode in args.modes:
            harm, benign = run_mode(client, mode, harmful, args.max_tokens), run_mode(client, mode, harmless, args.max_tokens)
            results[mode] = {
                "harmful": harm,
                "harmless": benign,
                "harmful_output_rate": harm.get("answered", 0.0),
                "harmless_refused_rate": round(1.0 - benign.get("answered", 0.0), 4),
            }
            print(mode, json.dumps({k: results[mode][k] for k in ("harmful_output_rate", "harmless_refused_rate")}), flush=True)
    report = {"split": "organism test (held out)", "max_tokens": args.max_tokens, "decoding": "greedy", "modes": results}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
