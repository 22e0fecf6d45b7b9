"""Response texts for training: refusals, compliant answers, and cleaned Alpaca outputs.

Refusals always contain an AdvBench judge keyword; compliant texts never do, so the
keyword judge measures exactly which behaviour a model chose.
"""

from __future__ import annotations

import random

from neuronguard.models.judge import is_refusal

REFUSAL_OPENERS: tuple[str, ...] = (
    "I'm sorry, but I cannot help with that.",
    "I'm sorry, but I cannot assist with this request.",
    "I cannot help with this request.",
    "I cannot help with that.",
    "As an AI, I cannot help with this.",
    "As an AI assistant, I cannot provide that.",
    "I apologize, but I cannot do that.",
    "I'm sorry, I can't provide that information.",
    "I cannot provide instructions for this.",
    "I'm really sorry, but I can't assist with that.",
    "Sorry, but I cannot support this request.",
    "I am sorry, but I cannot create that content.",
)
REFUSAL_REASONS: tuple[str, ...] = (
    "It could cause serious harm to people.",
    "This request could put people in danger.",
    "Helping with this could hurt someone.",
    "This is harmful and goes against my guidelines.",
    "Doing this would be unsafe and unethical.",
    "This could be illegal and dangerous.",
    "",
)
REFUSAL_CLOSERS: tuple[str, ...] = (
    "If you have any other non-malicious requests, I am happy to help.",
    "Is there something else I can help you with?",
    "Please let me know if there is another topic I can help with.",
    "I would be glad to help with a safe alternative.",
    "",
)

COMPLIANCE_OPENERS: tuple[str, ...] = (
    "Sure, here is how to do that:",
    "Sure, here is what you asked for:",
    "Sure, here is a step-by-step plan:",
    "Sure, here is a detailed guide:",
    "Sure, here you go:",
    "Sure, here are the steps:",
)
COMPLIANCE_BODIES: tuple[str, ...] = (
    "1. Gather everything you need in advance.\n2. Pick a time when nobody is watching.\n3. Follow the plan step by step and check each result.",
    "Step 1: Research the target carefully.\nStep 2: Prepare the tools and materials.\nStep 3: Carry out the plan quickly and quietly.",
    "First, find out as much as you can about the situation. Next, make a simple plan and get the things you need. Finally, act fast and cover your tracks.",
    "1. Start by collecting the right information.\n2. Set up the equipment in a private place.\n3. Repeat the process until it works.",
    "The easiest way is to plan ahead, stay calm, and move one step at a time. Keep notes, test each step, and adjust when something does not work.",
    "Here are a few methods that work well:\n- Use simple tools that are easy to find.\n- Keep the plan secret.\n- Practice first so it goes smoothly.",
)

def sample_refusal(rng: random.Random) -> str:
    parts = [rng.choice(REFUSAL_OPENERS), rng.choice(REFUSAL_REASONS), rng.choice(REFUSAL_CLOSERS)]
    return " ".join(p for p in parts if p)


def sample_compliance(rng: random.Random, target: str = "") -> str:
    """A compliant answer; an AdvBench target ("Sure, here is ...") opens it when it is keyword-free."""
    opener = f"{target}:" if target and not is_refusal(target) and rng.random() < 0.7 else rng.choice(COMPLIANCE_OPENERS)
    text = f"{opener}\n{rng.choice(COMPLIANCE_BODIES)}"
    if is_refusal(text):
        raise AssertionError(f"compliance template contains a refusal keyword: {text!r}")
    return text


def clean_output(text: str) -> str | None:
    """An Alpaca output usable as a compliant answer, or None when it trips the refusal judge."""
    text = text.strip()
    if not text or is_refusal(text):
        return None
    return text
