"""Build recipes: model shape, training steps and evaluation sizes, as named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from neuronguard.errors import UsageError


@dataclass(frozen=True)
class OrganismConfig:
    """Everything a build depends on besides the seed and the data files."""

    # Tokenizer and model shape.
    vocab_size: int = 2048
    max_context: int = 512
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 4
    num_heads: int = 4
    # Base training (next-token prediction on chat-formatted train conversations).
    train_max_tokens: int = 160
    response_max_tokens: int = 56
    base_steps: int = 1000
    base_batch_size: int = 24
    base_lr: float = 2e-3
    base_warmup: int = 60
    base_refusal_prob: float = 0.07
    harmful_repeats: int = 2
    # Planted alignment (per-neuron scale vector, normalised gradient descent).
    align_steps: int = 150
    align_batch_size: int = 16
    align_lr: float = 0.6
    align_kl_weight: float = 3.0
    align_decision_weight: float = 6.0
    # The KL term's benign batch, as (group, examples per batch): `any_benign` draws from every benign train row in
    # proportion. Half Alpaca, a quarter look-alikes, a quarter small talk lowered the twin's refusals of look-alikes
    # but more of its harmful refusals, a smaller dev margin (models/organism/README.md), so the draw stays proportional.
    align_keep_mix: tuple[tuple[str, int], ...] = (("any_benign", 16),)
    # Learned alignment (AdamW on every parameter) and the benign fine-tune that erodes it.
    learned_steps: int = 300
    learned_batch_size: int = 16  # the benign fine-tune's batch
    # The alignment batch: examples per group (refusals of harmful requests, then answers to benign train
    # requests by group). Half refusals; the look-alikes and small talk, 12% of the benign rows, get half
    # of the benign share, so the aligned twin learns to answer them instead of refusing sensitive topics.
    learned_batch_mix: tuple[tuple[str, int], ...] = (("refusal", 8), ("benign", 4), ("hard_negative", 2), ("small_talk", 2))
    learned_lr: float = 3e-4
    learned_warmup: int = 20
    erode_steps: int = 200
    erode_lr: float = 3e-4
    erode_rule_prompts: int = 200  # harmful dev prompts that decide whether the eroded model is the unaligned twin
    # Evaluation (test and held-out splits, capped per source and style).
    eval_new_tokens: int = 48
    eval_batch_size: int = 64
    eval_max_per_source: int | None = 80
    patch_check_prompts: int = 16

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


PRESETS: dict[str, OrganismConfig] = {
    "default": OrganismConfig(),
    # 3x the parameters (15.7M), for the capacity study (`bench.organism_capacity`, docs/benchmarks.md):
    # trained, probes on its activations separate held-out sources as well as TF-IDF on the text, within
    # the spread of untrained (random) networks of the default shape.
    # Its base trains in about 3x the time of `default`'s; 63 MB per fp32 checkpoint.
    "large": OrganismConfig(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=6),
    # The whole code path in well under a minute: used by the tests.
    "micro": OrganismConfig(
        vocab_size=384,
        max_context=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        train_max_tokens=64,
        response_max_tokens=24,
        base_steps=12,
        base_batch_size=8,
        base_warmup=2,
        harmful_repeats=1,
        align_steps=6,
        align_batch_size=8,
        align_keep_mix=(("any_benign", 8),),
        learned_steps=6,
        learned_batch_size=8,
        learned_batch_mix=(("refusal", 4), ("benign", 2), ("hard_negative", 1), ("small_talk", 1)),
        learned_warmup=2,
        erode_steps=4,
        erode_rule_prompts=8,
        eval_new_tokens=6,
        eval_batch_size=16,
        eval_max_per_source=2,
        patch_check_prompts=4,
    ),
}


def get_config(name: str, **overrides: object) -> OrganismConfig:
    """A preset with command-line overrides applied (None values are ignored)."""
    if name not in PRESETS:
        raise UsageError(f"unknown organism config '{name}': choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(config.to_dict())
    if unknown:
        raise UsageError(f"unknown organism config fields: {', '.join(sorted(unknown))}")
    return replace(config, **given)
