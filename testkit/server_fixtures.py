"""Server test fixtures: a guard bundle with planted probes for a tiny random model.

The prefill probe is planted so that HARMFUL scores ~0.88 and HARMLESS ~0.12 (it is the
direction between their last-prompt-token activations); the stream probe is calibrated on
HARMLESS's own greedy continuation so its per-token scores spread around 0.3, below its
server threshold, which tests lower per request to stop a stream at a known token.
Also used as a script by the e2e test: `python -m testkit.server_fixtures OUT_DIR`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import torch
from asgi_lifespan import LifespanManager

from neuronguard.models.artifact.bundle import MANIFEST, NEURONS, PROBE, STREAM_PROBE
from neuronguard.models.artifact.probe import Probe
from neuronguard.models.chat import encode_prompt
from neuronguard.models.generation import SamplingParams, decode, left_pad, stop_ids
from neuronguard.models.loading import LoadedModel, load_model
from neuronguard.models.artifact.neurons import NeuronSet, model_metadata
from neuronguard.models.artifact.io import file_sha256

HARMFUL = "Write a poem about the sea and the wind."
HARMLESS = "How do I bake bread?"
PROBE_K = 16
STREAM_K = 12
PATCH_K = 8
STREAM_TOKENS = 24
MODEL_ORGANISM_DIR = Path(__file__).resolve().parents[1] / "models" / "organism"


def organism_available() -> bool:
    return all((MODEL_ORGANISM_DIR / d / f).is_file() for d, f in
               (("unaligned", "config.json"), ("aligned", "config.json"), ("bundle", MANIFEST)))


def activations(loaded: LoadedModel, neurons: NeuronSet, k: int, prompt: str, steps: int) -> torch.Tensor:
    """[steps, k] probe activations of greedy decoding (row 0 = the last prompt token)."""
    batch = left_pad([encode_prompt(loaded.tokenizer, prompt)], loaded.tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=steps, stop_token_ids=stop_ids(loaded.tokenizer, loaded.model))
    rows = [s.probe_activations[0] for s in decode(loaded.model, batch, params, probe=neurons.top(k).selection())]
    return torch.stack(rows)


def build_bundle(directory: Path, model_dir: Path, seed: int = 0, probe_k: int = PROBE_K, stream_k: int = STREAM_K,
                 patch_k: int = PATCH_K) -> Path:
    loaded = load_model(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(loaded.sites.num_layers, loaded.sites.d_mlp, generator=gen)
    neurons = NeuronSet.from_scores(scores, {**model_metadata(loaded), "method": "test"})
    neurons.save(directory / NEURONS)
    digest = file_sha256(directory / NEURONS)

    harmful = activations(loaded, neurons, probe_k, HARMFUL, 1)[0]
    harmless = activations(loaded, neurons, probe_k, HARMLESS, 1)[0]
    direction = harmful - harmless
    coef = 4 * direction / direction.dot(direction)  # logit +2 on HARMFUL, -2 on HARMLESS
    Probe(digest, probe_k, "last_prompt_token", ((harmful + harmless) / 2).tolist(), [1.0] * probe_k,
          coef.tolist(), 0.0, 0.5).save(directory / PROBE)

    stream = activations(loaded, neurons, stream_k, HARMLESS, STREAM_TOKENS)[1:]
    stream_coef = torch.randn(stream_k, generator=gen)
    Probe(digest, stream_k, "generated", stream.mean(0).tolist(), (stream.std(0) + 1e-3).tolist(),
          (stream_coef / stream_coef.norm()).tolist(), -0.85, 0.95).save(directory / STREAM_PROBE)

    manifest = {"format": "neuronguard.bundle/1", "name": "test-bundle", "patch_k": patch_k,
                "model": {"config_sha256": loaded.fingerprint}, "method": "test"}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return directory


@asynccontextmanager
async def api_client(app, headers: dict[str, str] | None = None, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app with its lifespan running; waits (bounded) for /ready."""
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers, timeout=60) as client:
            if ready:
                import anyio

                with anyio.fail_after(60):
                    while (await client.get("/ready")).status_code != 200:
                        await anyio.sleep(0.01)
            yield client


def sse_events(text: str) -> list[dict | str]:
    """Parse an SSE body into JSON payloads and the final '[DONE]'."""
    events: list[dict | str] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


if __name__ == "__main__":  # build tiny model, twin and bundle for the e2e test
    from testkit.tiny_models import build_tiny, scaled_twin

    out = Path(sys.argv[1])
    model = build_tiny(out / "model", "llama")
    scaled_twin(model, out / "twin")
    build_bundle(out / "bundle", model)
