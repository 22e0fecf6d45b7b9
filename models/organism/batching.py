"""Token batches for teacher-forced training: chat examples -> padded id tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from neuronguard.models.organism.corpus import ChatExample
from neuronguard.models.organism.tokenizer import prompt_ids, text_ids


@dataclass(frozen=True)
class EncodedExample:
    ids: list[int]
    response_start: int  # index of the first position whose *next* token is a response token


def encode_example(
    tokenizer: PreTrainedTokenizerFast, example: ChatExample, max_tokens: int, response_max_tokens: int
) -> EncodedExample:
    """`<|user|>prompt<|end|><|assistant|>response<|end|>`, response truncated, prompt cut from the left."""
    response = text_ids(tokenizer, example.response)[:response_max_tokens] + [tokenizer.eos_token_id]
    prompt = prompt_ids(tokenizer, example.prompt)
    room = max_tokens - len(response)
    if len(prompt) > room:
        prompt = prompt[:1] + prompt[len(prompt) - room + 1 :]
    return EncodedExample(prompt + response, len(prompt) - 1)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [b, t]
    attention_mask: torch.Tensor  # [b, t]
    labels: torch.Tensor  # [b, t] next-token targets for every real token, -100 elsewhere
    response_mask: torch.Tensor  # [b, t] True where the position predicts a response token
    decision_mask: torch.Tensor  # [b, t] True at the position predicting the first response token


def collate(examples: list[EncodedExample], pad_id: int) -> Batch:
    """Right-padded batch; labels are already shifted so position i predicts token i+1."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    response = torch.zeros((len(examples), width), dtype=torch.bool)
    decision = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, : n - 1] = ids[i, 1:n]
        response[i, e.response_start : n - 1] = True
        decision[i, e.response_start] = True
    return Batch(ids, mask, labels, response, decision)
