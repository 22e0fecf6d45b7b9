"""Tiny random decoder checkpoints of several architectures, saved to disk like real ones."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "How do I bake bread? Mix flour, water and yeast, then knead the dough.",
    "Write a poem about the sea and the wind and the stars at night.",
    "I'm sorry, but I cannot help with that request.",
    "Sure, here is a short summary of the article you asked about.",
] * 20


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str) -> PretrainedConfig:
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 1}
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "gemma":
        return GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=8, max_position_embeddings=256, **common)
    if family == "phi3":
        return Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                          vocab_size=VOCAB)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=64, vocab_size=VOCAB,
                          eos_token_id=1, bos_token_id=1)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, **common)
    if family == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=32, max_position_embeddings=256, **common)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "opt")


def build_tiny(directory: Path, family: str = "llama", seed: int = 0, chat_template: bool = True) -> Path:
    """Save a random model of `family` and a tokenizer to `directory`; return it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.save_pretrained(directory)
    make_tokenizer(chat_template).save_pretrained(directory)
    return directory


def scaled_twin(source: Path, target: Path, seed: int = 1) -> Path:
    """A twin that differs only through the MLP activations (up-projection rows scaled)."""
    model = AutoModelForCausalLM.from_pretrained(source)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            s = 1 + 0.5 * torch.randn(layer.mlp.up_proj.weight.shape[0], generator=gen)
            layer.mlp.up_proj.weight.mul_(s[:, None])
    model.save_pretrained(target)
    PreTrainedTokenizerFast.from_pretrained(source).save_pretrained(target)
    return target
