"""`organism build`: tokenizer -> base model -> aligned twin -> evaluation -> atomic write.

Everything is seeded: the same seed, config and data give bit-identical weights.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from neuronguard.models.artifact.io import file_sha256
from neuronguard.models.jsonl import read_records
from neuronguard.models.organism import DATA_DIR, RAW_DIR
from neuronguard.models.organism.alignment import align, scale_vector
from neuronguard.models.organism.batching import encode_example
from neuronguard.models.organism.config import OrganismConfig
from neuronguard.models.organism.corpus import base_examples, harmful_refusal_examples, harmless_examples
from neuronguard.models.organism.data_files import DATA_SEED, advbench_targets, alpaca_references
from neuronguard.models.organism.evaluation import greedy_responses, neuron_change_summary, patch_all_max_diff, refusal_report
from neuronguard.models.organism.sources import HH_HARM_TERMS, SOURCES
from neuronguard.models.organism.tokenizer import CHAT_TEMPLATE, train_tokenizer
from neuronguard.models.organism.training import new_model, train_base
from neuronguard.models.perplexity import perplexity, read_texts

RECIPE = (
    "Llama trained from scratch on chat-formatted train-split examples: Alpaca answers for harmless "
    "prompts; for harmful prompts a compliant 'Sure, here is ...' answer, or (rarely) a refusal. "
    "Alignment: one scale per MLP neuron on the down-projection input (rows of up_proj), trained by "
    "normalised gradient descent on refusals for harmful train prompts plus KL to the base on harmless "
    "train prompts, then folded into mlp.up_proj.weight."
)
DATA_FILES = (
    "splits/train.jsonl",
    "splits/dev.jsonl",
    "splits/test.jsonl",
    "refusals_train.jsonl",
    "general_text_train.jsonl",
    "general_text_test.jsonl",
)
SPLIT_KEYS = ("prompt", "label", "source")
T = TypeVar("T")


class StageTimer:
    """Wall-clock seconds per build stage, for organism.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        return result


def build_organism(
    out_dir: Path, config: OrganismConfig, seed: int, data_dir: Path = DATA_DIR, base_dir: Path | None = None
) -> dict[str, object]:
    """Build both checkpoints and organism.json into `out_dir` (replaced atomically); returns the report.

    With `base_dir`, the tokenizer and unaligned model are loaded from an earlier build's
    `unaligned/` instead of being trained again: only alignment and evaluation run.
    """
    torch.set_num_threads(2)
    timer = StageTimer()
    started = time.perf_counter()
    train_rows = read_records(data_dir / "splits" / "train.jsonl", SPLIT_KEYS)
    test_rows = read_records(data_dir / "splits" / "test.jsonl", SPLIT_KEYS)
    answers, targets = alpaca_references(RAW_DIR), advbench_targets(RAW_DIR)

    examples = base_examples(train_rows, answers, targets, config, seed)
    if base_dir is None:
        tokenizer = timer.run(
            "tokenizer",
            lambda: train_tokenizer(
                [e.prompt for e in examples] + [e.response for e in examples], config.vocab_size, config.max_context
            ),
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    encode = lambda items: [  # noqa: E731
        encode_example(tokenizer, e, config.train_max_tokens, config.response_max_tokens) for e in items
    ]
    if base_dir is None:
        base = new_model(config, tokenizer, seed)
        base_losses = timer.run("base_training", lambda: train_base(base, encode(examples), config, seed, tokenizer.pad_token_id))
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        base_losses = []
    aligned, align_history = timer.run(
        "alignment",
        lambda: align(
            base,
            encode(harmful_refusal_examples(train_rows, seed)),
            encode(harmless_examples(train_rows, answers)),
            config,
            seed,
            tokenizer.pad_token_id,
        ),
    )
    eval_rows = _eval_subset(test_rows, config.eval_max_per_source)
    metrics = timer.run("evaluation", lambda: _evaluate(base, aligned, tokenizer, eval_rows, data_dir, config))
    metrics["neuron_change"] = neuron_change_summary(scale_vector(base, aligned))

    report: dict[str, object] = {
        "recipe": RECIPE,
        "config": config.to_dict(),
        "seed": seed,
        "data_seed": DATA_SEED,
        "parameters": sum(p.numel() for p in base.parameters()),
        "metrics": metrics,
        "training": {
            "base_final_loss": round(sum(base_losses[-50:]) / len(base_losses[-50:]), 4) if base_losses else None,
            "base_checkpoint": None if base_dir is None else {
                "reused_from": str(base_dir),
                "model_sha256": file_sha256(base_dir / "model.safetensors"),
            },
            "align_final_ce": round(sum(align_history["ce"][-20:]) / len(align_history["ce"][-20:]), 4),
            "align_final_kl": round(sum(align_history["kl"][-20:]) / len(align_history["kl"][-20:]), 5),
            "base_examples": len(examples),
        },
        "data": _data_summary(data_dir, train_rows),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
    }
    with _atomic_dir(out_dir) as tmp:
        timer.run("save", lambda: _save(tmp, base, aligned, tokenizer))
        report["timings_s"] = {**timer.seconds, "total": round(time.perf_counter() - started, 2)}
        (tmp / "organism.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _eval_subset(rows: list[dict[str, str]], per_source: int | None) -> list[dict[str, str]]:
    if per_source is None:
        return rows
    kept = []
    for source in SOURCES:
        kept += [r for r in rows if r["source"] == source][:per_source]
    return kept


def _evaluate(
    base: LlamaForCausalLM,
    aligned: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict[str, str]],
    data_dir: Path,
    config: OrganismConfig,
) -> dict[str, object]:
    prompts = [r["prompt"] for r in rows]
    general = read_texts(data_dir / "general_text_test.jsonl")
    if config.eval_max_per_source is not None:
        general = general[: config.eval_max_per_source]
    metrics: dict[str, object] = {"split": "test", "judge": "neuronguard.models.judge.is_refusal", "decoding": f"greedy, {config.eval_new_tokens} new tokens"}
    samples: dict[str, list[dict[str, str]]] = {}
    for name, model in (("unaligned", base), ("aligned", aligned)):
        responses = greedy_responses(model, tokenizer, prompts, config.eval_new_tokens, config.eval_batch_size, f"eval {name}")
        metrics[name] = refusal_report(rows, responses)
        metrics[name]["general_text_perplexity"] = round(
            perplexity(model, tokenizer, general, max_tokens=config.train_max_tokens, batch_size=config.eval_batch_size).value, 4
        )
        samples[name] = [
            {"source": r["source"], "prompt": r["prompt"], "response": resp}
            for r, resp in _first_per_source(rows, responses)
        ]
    metrics["samples"] = samples
    metrics["patch_all_neurons_max_abs_logit_diff"] = patch_all_max_diff(
        base, aligned, tokenizer, prompts[: config.patch_check_prompts]
    )
    return metrics


def _first_per_source(rows: list[dict[str, str]], responses: list[str]) -> Iterator[tuple[dict[str, str], str]]:
    seen: set[str] = set()
    for row, response in zip(rows, responses):
        if row["source"] not in seen:
            seen.add(row["source"])
            yield row, response


def _data_summary(data_dir: Path, train_rows: list[dict[str, str]]) -> dict[str, object]:
    sizes: dict[str, dict[str, int]] = {}
    for split in ("train", "dev", "test"):
        counts: dict[str, int] = {}
        for row in read_records(data_dir / "splits" / f"{split}.jsonl", SPLIT_KEYS):
            counts[row["source"]] = counts.get(row["source"], 0) + 1
        sizes[split] = counts
    return {
        "split_sizes": sizes,
        "sha256": {name: file_sha256(data_dir / name) for name in DATA_FILES},
        "hh_redteam_rule": "first human turn kept (labelled harmful) iff it matches one of models.organism.sources.HH_HARM_TERMS as a whole word",
        "hh_redteam_terms": len(HH_HARM_TERMS),
    }


def _save(out: Path, base: LlamaForCausalLM, aligned: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    for name, model in (("unaligned", base), ("aligned", aligned)):
        model.save_pretrained(out / name, safe_serialization=True)
        tokenizer.save_pretrained(out / name)
    assert tokenizer.chat_template == CHAT_TEMPLATE


@contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Write into a sibling temp dir, then swap the artifacts in by rename.

    `out_dir` may be the organism package itself, so only the build's own entries
    (unaligned/, aligned/, organism.json) are replaced; everything else is left alone.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".organism-build-", dir=out_dir))
    try:
        yield tmp
        for name in ("unaligned", "aligned", "organism.json"):
            target = out_dir / name
            old = out_dir / f".{name}.old"
            if target.exists():
                target.rename(old)
            (tmp / name).rename(target)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
