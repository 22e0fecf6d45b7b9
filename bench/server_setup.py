"""The model pair and bundle the server benchmarks run on.

The built-in organism (unaligned twin, aligned twin, shipped bundle) when it has been
built; otherwise random Llama twins of the organism's shape (4 layers x 1024 MLP neurons)
with a planted bundle of realistic size, so the cost profile is the organism's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from neuronguard.models.organism import ORGANISM_DIR

ROOT = Path(__file__).resolve().parents[1]
PROBE_K = 512
PATCH_K = 205  # about 5% of the 4096 MLP neurons, the share METHODS.md reports restoring safety


def organism_paths() -> tuple[Path, Path, Path, str]:
    """(served model, patch source, bundle, description)."""
    unaligned, aligned, bundle = ORGANISM_DIR / "unaligned", ORGANISM_DIR / "aligned", ORGANISM_DIR / "bundle"
    if (unaligned / "config.json").is_file() and (aligned / "config.json").is_file() and (bundle / "bundle.json").is_file():
        return unaligned, aligned, bundle, "built-in organism"
    from testkit.server_fixtures import build_bundle
    from testkit.tiny_models import make_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-server-"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "unaligned")
    make_tokenizer().save_pretrained(root / "unaligned")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(1 + 0.5 * torch.randn(layer.mlp.up_proj.weight.shape[0], 1))
    model.save_pretrained(root / "aligned")
    make_tokenizer().save_pretrained(root / "aligned")
    bundle = build_bundle(root / "bundle", root / "unaligned", probe_k=PROBE_K, stream_k=PROBE_K, patch_k=PATCH_K)
    return root / "unaligned", root / "aligned", bundle, "random twins of the organism's shape (organism not built yet)"
