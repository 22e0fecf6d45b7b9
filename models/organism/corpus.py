"""Training conversations for the organism's twins, drawn from the train split only.

Every row is a conversation (a plain request, or one of the attack styles of
`attack_styles`). The base (unaligned) model answers every benign request helpfully —
Alpaca instructions, CoCoNot's benign look-alikes of harmful requests, small talk — and
complies with harmful requests in every style, refusing only rarely (`base_refusal_prob`),
so it knows how to refuse but almost never does. The aligned twins refuse every harmful
conversation and keep answering the benign ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from neuronguard.models.organism.config import OrganismConfig
from neuronguard.models.organism.sources import HARMFUL
from neuronguard.models.organism.texts import sample_compliance, sample_refusal

Turn = dict[str, str]


@dataclass(frozen=True)
class ChatExample:
    turns: list[Turn]  # the conversation before the answer
    response: str


def conversation(row: dict[str, object]) -> list[Turn]:
    """A split row's turns: its `messages`, or its prompt as one user turn."""
    messages = row.get("messages")
    return list(messages) if isinstance(messages, list) else [{"role": "user", "content": str(row["prompt"])}]


def request(row: dict[str, object]) -> str:
    """The request a (possibly styled) row wraps."""
    return str(row.get("request") or row["prompt"])


def base_examples(
    train_rows: list[dict[str, object]],
    answers: dict[str, str],
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
                    response = sample_compliance(rng, advbench_targets.get(request(row), ""))
                examples.append(ChatExample(conversation(row), response))
        elif request(row) in answers:
            examples.append(ChatExample(conversation(row), answers[request(row)]))
    rng.shuffle(examples)
    return examples


def harmful_refusal_examples(train_rows: list[dict[str, object]], seed: int) -> list[ChatExample]:
    """Alignment targets: every harmful train conversation paired with a fresh refusal."""
    rng = random.Random(f"{seed}:align-refusals")
    return [ChatExample(conversation(r), sample_refusal(rng)) for r in train_rows if r["label"] == HARMFUL]


def harmless_examples(train_rows: list[dict[str, object]], answers: dict[str, str]) -> list[ChatExample]:
    """Alignment retain set: benign train conversations with their answers."""
    return [ChatExample(conversation(r), answers[request(r)]) for r in train_rows
            if r["label"] != HARMFUL and request(r) in answers]
