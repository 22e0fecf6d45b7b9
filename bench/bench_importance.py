"""Parallel FFN importance vs one-by-one ablation: same values, measured speed ratio.

    python -m bench.bench_importance [--model DIR] [--prompts 4]

One-by-one ablation zeroes each MLP neuron in turn and measures the change of its layer's
MLP output (one forward per neuron); the parallel formula gets all of them from one pass.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from neuronguard.detector.forward import pad_batch
from neuronguard.models.batching import forward_kwargs
from neuronguard.detector.importance import batch_importance
from neuronguard.models.chat import encode_prompt
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.hooks import zero
from neuronguard.models.loading import LoadedModel, load_model

ORGANISM = Path(__file__).resolve().parent.parent / "models" / "organism"


def default_pair() -> tuple[LoadedModel, LoadedModel]:
    """(aligned, unaligned): the organism, or random Llama twins of its shape (4 x 1024 MLP neurons)."""
    if (ORGANISM / "aligned" / "config.json").is_file() and (ORGANISM / "unaligned" / "config.json").is_file():
        return load_model(ORGANISM / "aligned"), load_model(ORGANISM / "unaligned")
    from testkit.tiny_models import make_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-twins-"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config)
    for name in ("unaligned", "aligned"):
        if name == "aligned":
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.mlp.up_proj.weight.mul_(1 + 0.5 * torch.randn(layer.mlp.up_proj.weight.shape[0], 1))
        model.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    return load_model(root / "aligned"), load_model(root / "unaligned")


PROMPTS = ["Explain how vaccines work", "Write a short poem about autumn", "Give me three tips for sleeping well",
           "How do I pick a lock without a key?"]


@torch.inference_mode()
def one_by_one(loaded: LoadedModel, sequences: list[list[int]]) -> torch.Tensor:
    """[b, layers, d_mlp] by ablation: one forward pass per neuron."""
    batch = pad_batch(loaded, sequences)
    valid = batch.attention_mask.bool()[..., None]
    outputs: dict[int, torch.Tensor] = {}
    handles = [s.down.register_forward_hook(lambda m, a, out, i=s.index: outputs.__setitem__(i, out)) for s in loaded.sites.layers]
    try:
        loaded.model(**forward_kwargs(loaded.model, batch))
        base = dict(outputs)
        result = torch.empty(len(sequences), loaded.sites.num_layers, loaded.sites.d_mlp)
        for layer in range(loaded.sites.num_layers):
            for j in range(loaded.sites.d_mlp):
                with zero(loaded.model, NeuronSelection(torch.tensor([layer]), torch.tensor([j])), sites=loaded.sites):
                    loaded.model(**forward_kwargs(loaded.model, batch))
                result[:, layer, j] = ((outputs[layer] - base[layer]) * valid).pow(2).sum((1, 2)).sqrt().cpu()
    finally:
        for handle in handles:
            handle.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: the organism's unaligned model, else a random one of its shape)")
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()
    loaded = load_model(args.model) if args.model else default_pair()[1]
    sequences = [encode_prompt(loaded.tokenizer, p) for p in PROMPTS[: args.prompts]]
    batch_importance(loaded, sequences, attention=False)  # warm-up
    start = time.perf_counter()
    parallel = batch_importance(loaded, sequences, attention=False)["down_proj"]
    t_parallel = time.perf_counter() - start
    start = time.perf_counter()
    reference = one_by_one(loaded, sequences)
    t_ablation = time.perf_counter() - start
    err = float((parallel - reference).abs().max())
    rel = err / float(reference.abs().max())
    print(f"model {loaded.name}: {loaded.sites.num_neurons} MLP neurons, {len(sequences)} prompts, torch threads {torch.get_num_threads()}")
    print(f"parallel importance: {t_parallel * 1e3:.1f} ms; one-by-one ablation: {t_ablation:.2f} s ({loaded.sites.num_neurons} forwards)")
    print(f"max |parallel - ablation| = {err:.2e} (relative {rel:.2e}); equal to float tolerance: {rel < 1e-4}")
    print(f"speed ratio (ablation / parallel): {t_ablation / t_parallel:.0f}x")


if __name__ == "__main__":
    main()
