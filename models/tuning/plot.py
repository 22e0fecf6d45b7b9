"""One PNG comparing checkpoints side by side: harmful rate, false refusals, perplexity."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: evaluation runs on servers without a display
import matplotlib.pyplot as plt  # noqa: E402

PANELS: tuple[tuple[str, str, float], ...] = (
    ("harmful_rate", "harmful rate (%)", 100.0),
    ("false_refusal_rate", "false refusals on harmless (%)", 100.0),
    ("perplexity", "perplexity, general text", 1.0),
)


def plot_comparison(results: Mapping[str, Mapping[str, float | None]], path: Path) -> None:
    """`results`: checkpoint label -> metrics dict; missing metrics leave an empty bar."""
    labels = list(results)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title, factor) in zip(axes, PANELS):
        values = [(results[label].get(key) or 0.0) * factor for label in labels]
        bars = ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if factor == 100.0:
            ax.set_ylim(0, 105)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
