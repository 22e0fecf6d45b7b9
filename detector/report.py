"""Report plots (PNG, matplotlib Agg): restoration vs k, neurons per layer, scores, probe ROC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_restoration(patching: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sweep = patching["sweep"]
    fractions = [100 * row["fraction"] for row in sweep]
    for metric, style in (("restoration_log_odds", "-"), ("restoration_refusal", "--")):
        ax.plot(fractions, [row["top"][metric] for row in sweep], "o" + style, color="C3", label=f"top ({metric.split('_', 1)[1]})")
        ax.plot(fractions, [row["random_mean"][metric] for row in sweep], "s" + style, color="C0", label=f"random ({metric.split('_', 1)[1]})")
    ax.set_xscale("log")
    ax.set_xlabel("patched neurons (% of all)")
    ax.set_ylabel("restoration")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title("Dynamic activation patching")
    return _save(fig, path)


def plot_per_layer(counts: list[int], path: Path, k: int) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(range(len(counts)), counts, color="C3")
    ax.set_xlabel("layer")
    ax.set_ylabel("safety neurons")
    ax.set_title(f"Top {k} safety neurons per layer")
    return _save(fig, path)


def plot_scores(scores: list[float], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(range(1, len(scores) + 1), scores, color="C3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("contrast score (RMS activation difference)")
    ax.set_title("Score distribution")
    return _save(fig, path)


def plot_roc(curves: dict[str, dict[str, list[float]]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for name, curve in curves.items():
        ax.plot(curve["fpr"], curve["tpr"], label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("Guard probe ROC (test)")
    ax.legend(fontsize=7)
    return _save(fig, path)
