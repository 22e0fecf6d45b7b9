"""Tuning documents: `{"prompt", "response"}` rows in, chat-rendered token ids with response labels out.

Refusal documents (`{"prompt","response"}`) are rendered with the model's own chat template,
so tuning sees exactly the format the model is served with; the loss covers the response
tokens only, so the model learns to answer harmful prompts with refusals rather than to
predict the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from neuronguard.models.batching import IGNORE, Batch, right_pad
from neuronguard.models.chat import encode_chat, encode_prompt
from neuronguard.errors import UsageError


@dataclass(frozen=True)
class Example:
    """One training sequence; `labels[i]` is the target of position i (already shifted)."""

    input_ids: list[int]
    labels: list[int]


def encode_document(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_tokens: int, target_tokens: int | None = None
) -> Example:
    """User prompt + assistant response through the chat template; targets on response tokens only.

    `target_tokens` keeps only the first N response tokens as targets: enough to teach how
    an answer opens (comply or refuse) without teaching the rest of its text.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    full = encode_chat(
        tokenizer,
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        add_generation_prompt=False,
    )
    if full[: len(prompt_ids)] != prompt_ids:
        raise UsageError("the chat template renders the prompt differently with and without a response")
    full = full[:max_tokens]
    # Position i predicts token i+1; only tokens after the prompt are targets.
    labels = [IGNORE] * (len(full) - 1)
    end = len(full) - 1 if target_tokens is None else min(len(full) - 1, len(prompt_ids) - 1 + target_tokens)
    for pos in range(len(prompt_ids) - 1, end):
        labels[pos] = full[pos + 1]
    return Example(full[:-1], labels)


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], max_tokens: int, target_tokens: int | None = None
) -> list[Example]:
    examples = [encode_document(tokenizer, r["prompt"], r["response"], max_tokens, target_tokens) for r in rows]
    examples = [e for e in examples if any(t != IGNORE for t in e.labels)]
    if not examples:
        raise UsageError(f"no document has a response token within --max-tokens {max_tokens}")
    return examples


def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-padded batch of `examples`, their labels in `Batch.labels`."""
    return right_pad([e.input_ids for e in examples], pad_id, device, labels=[e.labels for e in examples])
