"""Random-initialised full-size model shapes for GPU timing (no weights needed to time).

`random_model("llama3-8b", "cuda", torch.bfloat16)` builds a Llama-3-8B-shaped model
directly on the device; timings of guard, probe and patching depend on shapes, not values.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from neuronguard.models.organism import ORGANISM_DIR

def _llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, context: int,
           **extra: float) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context, **extra)


SHAPES: dict[str, LlamaConfig] = {
    "organism": LlamaConfig.from_pretrained(ORGANISM_DIR / "unaligned"),  # the shipped organism's own config
    "llama3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192, rope_theta=500000.0),
    "llama2-7b": _llama(32000, 4096, 11008, 32, 32, 32, 4096),
}


def random_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of a named shape, materialised on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(SHAPES[shape], dtype=dtype)
    return model.eval().requires_grad_(False)
