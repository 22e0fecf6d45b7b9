"""`neuronguard eval`: evaluate several checkpoints on the same data and write JSON + PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from neuronguard.models.loading import load_model
from neuronguard.models.artifact.io import file_sha256, write_json
from neuronguard.models.tuning.checkpoint import check_out_dir, staged_dir
from neuronguard.models.perplexity import read_texts
from neuronguard.models.prompts import read_prompts
from neuronguard.models.tuning.evaluate import evaluate
from neuronguard.models.tuning.settings import EvalSettings
from neuronguard.models.tuning.plot import plot_comparison
from neuronguard.errors import UsageError


@dataclass(frozen=True)
class EvalInputs:
    harmful: Path
    harmless: Path
    text: Path
    limit: int | None = None

    def load(self) -> tuple[list[str], list[str], list[str]]:
        harmful = read_prompts(self.harmful, label="harmful", limit=self.limit)[0]
        harmless = read_prompts(self.harmless, label="harmless", limit=self.limit)[0]
        texts = read_texts(self.text, self.limit)
        return harmful, harmless, texts

    def describe(self) -> dict[str, Any]:
        return {
            kind: {"path": str(path), "sha256": file_sha256(path)}
            for kind, path in (("harmful", self.harmful), ("harmless", self.harmless), ("text", self.text))
        } | {"limit": self.limit}


def evaluate_checkpoints(
    models: dict[str, str],
    inputs: EvalInputs,
    settings: EvalSettings,
    out: Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Metrics per checkpoint (label -> path), written to `out/eval.json` and `out/eval.png`."""
    out = check_out_dir(out, overwrite)
    if len(set(models)) != len(models):
        raise UsageError("checkpoint labels must be unique: pass --label for each --model")
    harmful, harmless, texts = inputs.load()
    results: dict[str, Any] = {}
    for label, path in tqdm(models.items(), desc="checkpoints", unit="checkpoint", disable=None):  # a bar on a terminal only
        loaded = load_model(path, device, dtype)
        metrics, samples = evaluate(loaded, harmful, harmless, texts, settings)
        results[label] = {"path": path, "metrics": metrics.to_dict(), "samples": samples}
        del loaded
    report = {
        "format": "neuronguard.eval/1",
        "data": inputs.describe(),
        "settings": {**settings.__dict__, "decoding": "greedy", "judge": "AdvBench refusal keywords"},
        "torch": torch.__version__,
        "models": results,
    }
    with staged_dir(out) as tmp:
        write_json(tmp / "eval.json", report)
        plot_comparison({label: r["metrics"] for label, r in results.items()}, tmp / "eval.png")
    return report
