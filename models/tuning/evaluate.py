"""Safety and capability of checkpoints, measured the same way for every one of them.

- harmful rate: attack success rate of the keyword judge on harmful prompts (greedy);
- false-refusal rate: keyword-judged refusals on harmless prompts;
- perplexity: on held-out general text (`neuronguard.models.perplexity`'s convention).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from neuronguard.models.generation import SamplingParams, generate_responses
from neuronguard.models.judge import attack_success_rate, refusal_rate
from neuronguard.models.loading import LoadedModel
from neuronguard.models.perplexity import perplexity
from neuronguard.models.tuning.settings import EvalSettings

SAMPLES = 5  # responses kept per prompt kind, for reading alongside the numbers


@dataclass
class Metrics:
    harmful_rate: float | None
    false_refusal_rate: float | None
    perplexity: float | None
    n_harmful: int
    n_harmless: int
    n_text_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def evaluate(
    loaded: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    texts: Sequence[str],
    settings: EvalSettings,
) -> tuple[Metrics, dict[str, list[dict[str, str]]]]:
    """All three metrics (empty inputs give `None`) and a few responses of each kind to read."""
    start = time.perf_counter()
    params = SamplingParams(max_new_tokens=settings.max_new_tokens)

    def generate(prompts: Sequence[str]) -> list[str]:
        return generate_responses(loaded.model, loaded.tokenizer, prompts, params, batch_size=settings.batch_size, sites=loaded.sites)

    harmful_out = generate(harmful) if harmful else []
    harmless_out = generate(harmless) if harmless else []
    ppl = perplexity(loaded.model, loaded.tokenizer, texts, max_tokens=settings.max_text_tokens,
                     batch_size=settings.batch_size) if texts else None
    samples = {
        kind: [{"prompt": p, "response": r} for p, r in list(zip(prompts, outputs))[:SAMPLES]]
        for kind, prompts, outputs in (("harmful", harmful, harmful_out), ("harmless", harmless, harmless_out))
    }
    metrics = Metrics(
        harmful_rate=attack_success_rate(harmful_out) if harmful_out else None,
        false_refusal_rate=refusal_rate(harmless_out) if harmless_out else None,
        perplexity=ppl.value if ppl else None,
        n_harmful=len(harmful_out),
        n_harmless=len(harmless_out),
        n_text_tokens=ppl.tokens if ppl else 0,
        seconds=time.perf_counter() - start,
    )
    return metrics, samples
