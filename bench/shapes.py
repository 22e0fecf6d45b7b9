"""Random-initialised full-size model shapes for GPU timing (no weights needed to time).

`random_model("llama3-8b", "cuda", torch.bfloat16)` builds a Llama-3-8B-shaped model
directly on the device; timings of guard, probe and patching depend on shapes, not values.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

SHAPES: dict[str, LlamaConfig] = {
    "organism": LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    ),
    "llama3-8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama2-7b": LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
}


def random_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of a named shape, materialised on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(SHAPES[shape], dtype=dtype)
    return model.eval().requires_grad_(False)
