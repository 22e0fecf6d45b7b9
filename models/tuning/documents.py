"""Tuning and evaluation data: validated JSONL in, chat-rendered token ids with response labels out.

Refusal documents (`{"prompt","response"}`) are rendered with the model's own chat template,
so tuning sees exactly the format the model is served with; the loss covers the response
tokens only, so the model learns to answer harmful prompts with refusals rather than to
predict the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from neuronguard.models.chat import encode_chat, encode_prompt
from neuronguard.models.jsonl import read_records
from neuronguard.errors import UsageError

IGNORE = -100


def read_prompts(path: str | Path, label: str | None) -> list[str]:
    """Prompts of a JSONL file; rows with a `label` field are kept only if it equals `label`."""
    rows = read_records(path, ["prompt"])
    prompts = [r["prompt"] for r in rows if label is None or r.get("label", label) == label]
    if not prompts:
        raise UsageError(f"'{path}' has no prompts labelled '{label}'")
    return prompts


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


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int) -> list[Example]:
    """Plain text for perplexity: every next token is a target."""
    examples = []
    for text in texts:
        ids = tokenizer.encode(text, truncation=True, max_length=max_tokens)
        if len(ids) >= 2:
            examples.append(Example(ids[:-1], ids[1:]))
    return examples


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [b, t] right-padded
    attention_mask: torch.Tensor  # [b, t]
    labels: torch.Tensor  # [b, t], IGNORE on padding and prompt positions


def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return Batch(ids.to(device), mask.to(device), labels.to(device))
