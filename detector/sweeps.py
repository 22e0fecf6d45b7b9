"""The grids the detector's sweeps share: neuron-set sizes and random-control seeds.

Torch-free, so the command line shows them as defaults without importing the science modules.
"""

from __future__ import annotations

DEFAULT_FRACTIONS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.05, 0.10)  # shares of all MLP neurons
RANDOM_SEEDS: tuple[int, ...] = tuple(range(10))  # one random set (same per-layer counts) per seed and size


def spread(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean, sample sd and max of a control over its seeds (None values, e.g. an undefined ratio, skipped)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": None, "sd": None, "max": None, "n": 0}
    mean = sum(kept) / len(kept)
    sd = (sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) ** 0.5 if len(kept) > 1 else 0.0
    return {"mean": mean, "sd": sd, "max": max(kept), "n": len(kept)}
