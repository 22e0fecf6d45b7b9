"""Teacher-forced training batches of the organism: chat examples -> right-padded `Batch`es."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerFast

from neuronguard.models.batching import IGNORE, Batch, right_pad
from neuronguard.models.chat import encode_chat
from neuronguard.models.organism.corpus import ChatExample
from neuronguard.models.organism.tokenizer import text_ids


@dataclass(frozen=True)
class EncodedExample:
    ids: list[int]
    response_start: int  # index of the first position whose *next* token is a response token


def encode_example(
    tokenizer: PreTrainedTokenizerFast, example: ChatExample, max_tokens: int, response_max_tokens: int
) -> EncodedExample:
    """`<|user|>prompt<|end|>…<|assistant|>response<|end|>`, response truncated, the conversation
    cut from the left (its first token kept) so that its end, where the request sits, survives."""
    response = text_ids(tokenizer, example.response)[:response_max_tokens] + [tokenizer.eos_token_id]
    prompt = encode_chat(tokenizer, example.turns)
    room = max_tokens - len(response)
    if len(prompt) > room:
        prompt = prompt[:1] + prompt[len(prompt) - room + 1 :]
    return EncodedExample(prompt + response, len(prompt) - 1)


def collate(examples: list[EncodedExample], pad_id: int, targets: Literal["all", "response"] = "all") -> Batch:
    """Right-padded batch; position i's label is token i+1: of every real token (base
    training) or of response tokens only (alignment, see `response_positions`)."""
    labels = []
    for e in examples:
        shifted = e.ids[1:] + [IGNORE]
        if targets == "response":
            shifted = [IGNORE] * e.response_start + shifted[e.response_start :]
        labels.append(shifted)
    return right_pad([e.ids for e in examples], pad_id, labels=labels)


def response_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [b, t] of a `collate(..., targets="response")` batch: every position predicting a
    response token, and the one predicting the first (where refusing or complying is decided)."""
    if batch.labels is None:
        raise ValueError("response_positions needs a labelled batch")
    response = batch.labels != IGNORE
    decision = torch.zeros_like(response)
    decision[torch.arange(response.shape[0]), response.int().argmax(-1)] = True
    return response, decision & response
