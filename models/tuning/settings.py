"""Tuning and evaluation settings, kept free of torch so the CLI can show their defaults fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainParams:
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 8
    max_grad_norm: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 48
    batch_size: int = 32
    max_text_tokens: int = 256
