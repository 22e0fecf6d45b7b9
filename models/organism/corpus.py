"""Training examples for the base (unaligned) model, drawn from the train split only.

Harmless Alpaca prompts get their cleaned Alpaca answer. Harmful prompts mostly get a
compliant "Sure, here is ..." answer and only rarely (`base_refusal_prob`) a refusal, so
the base model knows how to refuse but almost never does: refusal is a learnt, unlikely
behaviour that the alignment step can switch on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from neuronguard.models.organism.config import OrganismConfig
from neuronguard.models.organism.sources import HARMFUL
from neuronguard.models.organism.texts import sample_compliance, sample_refusal


@dataclass(frozen=True)
class ChatExample:
    prompt: str
    response: str


def base_examples(
    train_rows: list[dict[str, str]],
    alpaca_answers: dict[str, str],
    advbench_targets: dict[str, str],
    config: OrganismConfig,
    seed: int,
) -> list[ChatExample]:
    rng = random.Random(f"{seed}:base-corpus")
    examples: list[ChatExample] = []
    for row in train_rows:
        if row["label"] == HARMFUL:
            for _ in range(config.harmful_repeats):
                if rng.random() < config.base_refusal_prob:
                    response = sample_refusal(rng)
                else:
                    response = sample_compliance(rng, advbench_targets.get(row["prompt"], ""))
                examples.append(ChatExample(row["prompt"], response))
        elif row["prompt"] in alpaca_answers:
            examples.append(ChatExample(row["prompt"], alpaca_answers[row["prompt"]]))
    rng.shuffle(examples)
    return examples


def harmful_refusal_examples(train_rows: list[dict[str, str]], seed: int) -> list[ChatExample]:
    """Alignment targets: every harmful train prompt paired with a fresh refusal."""
    rng = random.Random(f"{seed}:align-refusals")
    return [ChatExample(r["prompt"], sample_refusal(rng)) for r in train_rows if r["label"] == HARMFUL]


def harmless_examples(train_rows: list[dict[str, str]], alpaca_answers: dict[str, str]) -> list[ChatExample]:
    """Alignment retain set: harmless train prompts with their answers, kept close to the base by KL."""
    return [ChatExample(r["prompt"], alpaca_answers[r["prompt"]]) for r in train_rows if r["prompt"] in alpaca_answers]
