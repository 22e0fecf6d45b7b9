"""Base model: a small Llama trained from scratch by next-token prediction on the base corpus."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from neuronguard.models.batching import Batch
from neuronguard.models.organism.batching import EncodedExample, collate
from neuronguard.models.organism.config import OrganismConfig


def new_model(config: OrganismConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(model_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def length_bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches of similar length (less padding, so less wasted CPU), in seeded random order."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def adamw_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: Batch, lr: float) -> float:
    """One optimiser step on the batch's labelled positions (gradients clipped to norm 1); returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = lm_loss(logits, batch.labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


@torch.enable_grad()
def train_base(
    model: LlamaForCausalLM, examples: list[EncodedExample], config: OrganismConfig, seed: int, pad_id: int
) -> list[float]:
    """AdamW with warmup and cosine decay over a seeded shuffle; returns the loss curve.

    Gradients are enabled explicitly: inference code in the same CLI process may have
    switched them off globally.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.base_lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    batches: list[list[int]] = []
    losses: list[float] = []
    progress = tqdm(range(config.base_steps), desc="base training", unit="step")
    for step in progress:
        if not batches:
            batches = length_bucketed_batches([len(e.ids) for e in examples], config.base_batch_size, generator)
        batch = collate([examples[i] for i in batches.pop()], pad_id)
        losses.append(adamw_step(model, optimizer, batch, cosine_lr(step, config.base_steps, config.base_lr, config.base_warmup)))
        if step % 20 == 0:
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses
