"""The grids the detector's sweeps share: neuron-set sizes and random-control seeds.

Torch-free, so the command line shows them as defaults without importing the science modules.
"""

from __future__ import annotations

DEFAULT_FRACTIONS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.05, 0.10)  # shares of all MLP neurons
RANDOM_SEEDS: tuple[int, ...] = (0, 1, 2)  # one random set (same per-layer counts) per seed and size
