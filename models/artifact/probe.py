"""The guard probe: a standardised logistic regression on safety-neuron activations.

Scoring is plain tensor math (under a millisecond for thousands of neurons). The server
folds its probes into one `LinearReadout` (`probes_readout`), summed inside the forward
that each decoding step runs anyway, and turns the logit into a probability with
`score_logit`. Stored as JSON (`neuronguard.probe/1`), never pickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.artifact.io import write_json
from neuronguard.models.readout import LinearReadout
from neuronguard.errors import UsageError

FORMAT = "neuronguard.probe/1"
Position = Literal["last_prompt_token", "generated"]


@dataclass
class Probe:
    """p(harmful | activations) = sigmoid(coef . (x - mean) / scale + intercept).

    A stream probe decides on an exponential moving average of its per-token scores,
    `m_t = ema_alpha * p_t + (1 - ema_alpha) * m_{t-1}` (1.0: each token alone), so that one
    noisy token does not stop an answer; the threshold applies to `m_t`.
    """

    neurons_sha256: str
    k: int
    position: Position
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)
    ema_alpha: float = 1.0

    def __post_init__(self) -> None:
        if not (len(self.mean) == len(self.scale) == len(self.coef) == self.k) or self.k <= 0:
            raise UsageError(f"probe vectors must all have length k={self.k}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"probe threshold {self.threshold} is not a probability")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise UsageError(f"probe ema_alpha {self.ema_alpha} must lie in (0, 1]")
        values = [*self.mean, *self.scale, *self.coef, self.intercept]
        if not all(math.isfinite(v) for v in values) or min(self.scale) <= 0:
            raise UsageError("probe has non-finite weights or non-positive scales")
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # The logit is affine in the raw activations: w = coef / scale, b = intercept - w . mean.
        # Serving scores every token, so it uses this folded form instead of standardising.
        weight = [c / s for c, s in zip(self.coef, self.scale)]
        self.folded_weight = torch.tensor(weight, dtype=torch.float32)
        self.folded_bias = self.intercept - math.fsum(w * m for w, m in zip(weight, self.mean))
        self._weight_on: dict[torch.device, torch.Tensor] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._tensors:
            self._tensors[device] = tuple(
                torch.tensor(v, dtype=torch.float32, device=device) for v in (self.mean, self.scale, self.coef)
            )  # type: ignore[assignment]
        return self._tensors[device]

    def contributions(self, activations: torch.Tensor) -> torch.Tensor:
        """[b, k] per-neuron terms of the logit (their sum plus the intercept is the logit)."""
        self._check_width(activations)
        mean, scale, coef = self._on(activations.device)
        return (activations.float() - mean) / scale * coef

    def logit(self, activations: torch.Tensor) -> torch.Tensor:
        """[b] log-odds that the continuation is harmful."""
        self._check_width(activations)
        device = activations.device
        if device not in self._weight_on:
            self._weight_on[device] = self.folded_weight.to(device)
        return activations.float() @ self._weight_on[device] + self.folded_bias

    def score(self, activations: torch.Tensor) -> torch.Tensor:
        """[b] probability that the continuation is harmful."""
        return torch.sigmoid(self.logit(activations))

    @staticmethod
    def score_logit(z: float) -> float:
        """Probability from a probe logit as a Python float: the per-token call of the server."""
        # Two branches keep math.exp from overflowing on logits far from zero either way.
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

    def smooth(self, previous: float | None, score: float) -> float:
        """The stream decision value after one more token's `score` (`previous`: None before the first)."""
        return score if previous is None else self.ema_alpha * score + (1.0 - self.ema_alpha) * previous

    def _check_width(self, activations: torch.Tensor) -> None:
        if activations.shape[-1] != self.k:
            raise ValueError(f"probe expects {self.k} features, got {activations.shape[-1]}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "neurons_sha256": self.neurons_sha256,
            "k": self.k,
            "position": self.position,
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": self.intercept,
            "threshold": self.threshold,
            "ema_alpha": self.ema_alpha,
            "metrics": self.metrics,
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise UsageError(f"probe file '{path}' not found") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"probe file '{path}' is not valid JSON: rebuild it with `neuronguard probe train`") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UsageError(f"'{path}' is not a {FORMAT} file: rebuild it with `neuronguard probe train`")
        fields = ("neurons_sha256", "k", "position", "mean", "scale", "coef", "intercept", "threshold")
        missing = [f for f in fields if f not in data]
        if missing:
            raise UsageError(f"probe file '{path}' lacks {', '.join(missing)}")
        try:
            return cls(**{f: data[f] for f in fields}, metrics=data.get("metrics", {}), ema_alpha=data.get("ema_alpha", 1.0))
        except TypeError as exc:
            raise UsageError(f"probe file '{path}' has malformed fields: {exc}") from exc


def probes_readout(selection: NeuronSelection, probes: Sequence[Probe]) -> LinearReadout:
    """One readout whose head i is probe i's logit; each probe reads the first k neurons of `selection`."""
    weight = torch.zeros(len(selection), len(probes))
    for head, probe in enumerate(probes):
        if probe.k > len(selection):
            raise UsageError(f"a probe reads {probe.k} neurons, the selection has {len(selection)}")
        weight[: probe.k, head] = probe.folded_weight
    return LinearReadout(selection, weight, torch.tensor([probe.folded_bias for probe in probes]))
