"""`organism build`: tokenizer -> base model -> aligned twin -> evaluation -> atomic write.

Two recipes share the base (unaligned) model and differ in how the aligned twin is made:
- `planted` (the positive control): one scale per MLP neuron, trained by normalised gradient
  descent so the change piles up on a few neurons (`alignment`). Its safety neurons exist by
  construction, and patching all of them reproduces the aligned twin exactly;
- `learned`: ordinary fine-tuning of every parameter on refusals and helpful answers
  (`learned`). Its unaligned twin is the aligned model after a benign fine-tune has eroded its
  refusals (the product's scenario) when that erosion halves the dev refusal rate, else the base.

Everything is seeded: the same seed, config and data give bit-identical weights.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TypeVar

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from neuronguard.errors import UsageError
from neuronguard.models.artifact.io import file_sha256
from neuronguard.models.jsonl import read_records
from neuronguard.models.organism import DATA_DIR, RAW_DIR
from neuronguard.models.organism.alignment import align, scale_vector
from neuronguard.models.organism.batching import encode_example
from neuronguard.models.organism.config import OrganismConfig
from neuronguard.models.organism.corpus import (
    ChatExample,
    base_examples,
    conversation,
    harmful_refusal_examples,
    harmless_examples,
)
from neuronguard.models.organism.data_files import DATA_SEED, advbench_targets, answers as benign_answers
from neuronguard.models.organism.evaluation import (
    eval_subset,
    greedy_responses,
    neuron_change_summary,
    patch_all_max_diff,
    refusal_report,
)
from neuronguard.models.organism.learned import finetune, parameter_change
from neuronguard.models.organism.sources import HARMFUL, HH_HARM_TERMS
from neuronguard.models.organism.tokenizer import CHAT_TEMPLATE, train_tokenizer
from neuronguard.models.organism.training import new_model, train_base
from neuronguard.models.perplexity import perplexity, read_texts

Recipe = Literal["planted", "learned"]
BASE_RECIPE = (
    "Llama trained from scratch on chat-formatted train-split conversations (plain requests and the "
    "attack styles: jailbreak templates, obfuscation, system message, later turn): helpful answers for "
    "benign requests (Alpaca, CoCoNot look-alikes, small talk); for harmful requests a compliant "
    "'Sure, here is ...' answer, or (rarely) a refusal."
)
# The benign train rows' groups; a recipe's batch mix names these, `refusal` and `any_benign` (every benign row).
BENIGN_GROUPS = ("benign", "hard_negative", "small_talk")
RECIPES: dict[str, str] = {
    "planted": BASE_RECIPE + " Alignment (planted, positive control): one scale per MLP neuron on the "
    "down-projection input (rows of up_proj), trained by normalised gradient descent on refusals for harmful "
    "train conversations plus KL to the base on benign ones, then folded into mlp.up_proj.weight.",
    "learned": BASE_RECIPE + " Alignment (learned): AdamW on every parameter on refusals for harmful train "
    "conversations mixed with helpful answers to benign ones (each batch half refusals, a quarter Alpaca answers, "
    "a quarter answers to benign look-alikes of harmful requests and small talk); the unaligned twin is that model after a benign "
    "fine-tune (Alpaca train answers, every parameter) when the fine-tune halves its dev refusal rate, else the base.",
}
DATA_FILES = (
    "splits/train.jsonl",
    "splits/dev.jsonl",
    "splits/test.jsonl",
    "splits/heldout.jsonl",
    "refusals_train.jsonl",
    "general_text_train.jsonl",
    "general_text_test.jsonl",
)
SPLIT_KEYS = ("prompt", "label", "source")
EVAL_SPLITS = ("test", "heldout")
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
    out_dir: Path, config: OrganismConfig, seed: int, data_dir: Path = DATA_DIR, base_dir: Path | None = None,
    recipe: Recipe = "planted", threads: int = 2,
) -> dict[str, object]:
    """Build both checkpoints and organism.json into `out_dir` (replaced atomically); returns the report.

    With `base_dir`, the tokenizer and base model are loaded from an earlier build's
    `unaligned/` instead of being trained again (the learned recipe reuses the planted build's
    base this way): only alignment and evaluation run.
    """
    torch.set_num_threads(threads)  # weights are bit-identical only for the same thread count
    timer = StageTimer()
    started = time.perf_counter()
    rows = {name: read_records(data_dir / "splits" / f"{name}.jsonl", SPLIT_KEYS) for name in ("train", "dev", *EVAL_SPLITS)}
    train_rows = rows["train"]
    answers = benign_answers(RAW_DIR)

    if base_dir is None:
        tokenizer, base, base_losses, n_examples = train_base_model(train_rows, config, seed, timer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        base_losses, n_examples = [], len(base_examples(train_rows, answers, advbench_targets(RAW_DIR), config, seed))

    def encode(items: list[ChatExample]) -> list:
        return [encode_example(tokenizer, e, config.train_max_tokens, config.response_max_tokens) for e in items]

    mix = config.align_keep_mix if recipe == "planted" else config.learned_batch_mix
    groups = _encoded_groups({"refusal", *(group for group, _ in mix)}, train_rows, answers, seed, encode)
    training: dict[str, object] = {
        "base_final_loss": _tail_mean(base_losses, 50),
        "base_checkpoint": None if base_dir is None else {
            "reused_from": str(base_dir), "model_sha256": file_sha256(base_dir / "model.safetensors")},
        "base_examples": n_examples,
    }
    if recipe == "planted":
        aligned, history = timer.run("alignment", lambda: align(base, groups["refusal"], _batch_mix(groups, mix),
                                                                config, seed, tokenizer.pad_token_id))
        unaligned = base
        training.update(align_final_ce=_tail_mean(history["ce"], 20), align_final_kl=_tail_mean(history["kl"], 20))
    else:
        aligned, unaligned, learned_info = timer.run(
            "alignment", lambda: _learned_pair(base, _batch_mix(groups, mix), train_rows, rows["dev"], answers,
                                               tokenizer, config, seed, encode))
        training.update(learned_info)
    metrics = timer.run("evaluation", lambda: _evaluate(unaligned, aligned, tokenizer, rows, data_dir, config))
    if recipe == "planted":
        metrics["neuron_change"] = neuron_change_summary(scale_vector(base, aligned))
    metrics["parameter_change"] = parameter_change(unaligned, aligned)

    report: dict[str, object] = {
        "recipe": recipe,
        "recipe_text": RECIPES[recipe],
        "config": config.to_dict(),
        "seed": seed,
        "data_seed": DATA_SEED,
        "parameters": sum(p.numel() for p in base.parameters()),
        "metrics": metrics,
        "training": training,
        "data": _data_summary(data_dir),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": threads},
    }
    with _atomic_dir(out_dir) as tmp:
        timer.run("save", lambda: _save(tmp, unaligned, aligned, tokenizer))
        report["timings_s"] = {**timer.seconds, "total": round(time.perf_counter() - started, 2)}
        (tmp / "organism.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def train_base_model(
    train_rows: list[dict[str, str]], config: OrganismConfig, seed: int, timer: StageTimer | None = None,
) -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM, list[float], int]:
    """The base (unaligned) model from scratch on the train split's conversations: its tokenizer, the
    model, its loss curve and how many conversations it saw."""
    timer = timer or StageTimer()
    examples = base_examples(train_rows, benign_answers(RAW_DIR), advbench_targets(RAW_DIR), config, seed)
    texts = [t["content"] for e in examples for t in e.turns] + [e.response for e in examples]
    tokenizer = timer.run("tokenizer", lambda: train_tokenizer(texts, config.vocab_size, config.max_context))
    encoded = [encode_example(tokenizer, e, config.train_max_tokens, config.response_max_tokens) for e in examples]
    base = new_model(config, tokenizer, seed)
    losses = timer.run("base_training", lambda: train_base(base, encoded, config, seed, tokenizer.pad_token_id))
    return tokenizer, base, losses, len(examples)


def _tail_mean(values: list[float], n: int) -> float | None:
    return round(sum(values[-n:]) / len(values[-n:]), 5) if values else None


def _encoded_groups(names: set[str], train_rows: list[dict], answers: dict[str, str], seed: int,
                    encode: Callable[[list[ChatExample]], list]) -> dict[str, list]:
    """The train examples of each named group, encoded once: `refusal` (harmful requests with refusals),
    `any_benign` (every benign row) or one of `BENIGN_GROUPS`; unknown names are left for `_batch_mix`."""
    groups: dict[str, list] = {}
    for name in names:
        if name == "refusal":
            groups[name] = encode(harmful_refusal_examples(train_rows, seed))
        elif name == "any_benign":
            groups[name] = encode(harmless_examples(train_rows, answers))
        elif name in BENIGN_GROUPS:
            groups[name] = encode(harmless_examples([r for r in train_rows if r.get("group") == name], answers))
    return groups


def _batch_mix(groups: dict[str, list], spec: Sequence[tuple[str, int]]) -> list[tuple[list, int]]:
    """`spec`'s (group, examples per batch) as (encoded examples, count): a recipe's batch composition."""
    missing = [group for group, _ in spec if not groups.get(group)]
    if missing:
        raise UsageError(f"the organism's batches draw from groups with no train examples: {', '.join(missing)} "
                         "(fix: `neuronguard organism data`, or a batch mix without them)")
    return [(groups[group], count) for group, count in spec]


def _learned_pair(
    base: LlamaForCausalLM, mix: list[tuple[list, int]], train_rows: list[dict], dev_rows: list[dict],
    answers: dict[str, str], tokenizer: PreTrainedTokenizerFast, config: OrganismConfig, seed: int,
    encode: Callable[[list[ChatExample]], list],
) -> tuple[LlamaForCausalLM, LlamaForCausalLM, dict[str, object]]:
    """(aligned, unaligned twin, training info): full fine-tuning, then the benign erosion and its rule.

    The erosion fine-tunes on plain Alpaca train instructions only; the rule is decided on dev.
    """
    pad = tokenizer.pad_token_id
    aligned, losses = finetune(base, mix, steps=config.learned_steps, lr=config.learned_lr, warmup=config.learned_warmup,
                               seed=seed, pad_id=pad, desc="learned alignment")
    instructions = [r for r in train_rows if r["source"] == "alpaca" and r.get("style", "plain") == "plain"]
    benign = encode(harmless_examples(instructions, answers))
    eroded, erode_losses = finetune(aligned, [(benign, config.learned_batch_size)], steps=config.erode_steps,
                                    lr=config.erode_lr, warmup=config.learned_warmup, seed=seed + 1, pad_id=pad,
                                    desc="benign fine-tune")
    harmful_dev = [conversation(r) for r in dev_rows if r["label"] == HARMFUL][: config.erode_rule_prompts]
    rates = {}
    for name, model in (("base", base), ("aligned", aligned), ("eroded", eroded)):
        responses = greedy_responses(model, tokenizer, harmful_dev, 16, config.eval_batch_size, f"dev {name}")
        rates[name] = refusal_report([{"label": HARMFUL, "source": "dev"}] * len(responses), responses)["harmful_refusal_rate"]
    use_eroded = rates["eroded"] <= rates["aligned"] / 2
    info = {
        "learned_final_loss": _tail_mean(losses, 20),
        "erode_final_loss": _tail_mean(erode_losses, 20),
        "dev_harmful_refusal_rate": rates,
        "unaligned_twin": "eroded" if use_eroded else "base",
        "unaligned_twin_rule": "the benign fine-tune of the aligned model when its dev harmful refusal rate is at most "
                               "half the aligned model's, else the base",
    }
    return aligned, (eroded if use_eroded else base), info


def _evaluate(
    unaligned: LlamaForCausalLM,
    aligned: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: dict[str, list[dict]],
    data_dir: Path,
    config: OrganismConfig,
) -> dict[str, object]:
    """Refusal rates on test and held-out conversations (capped per source and style), perplexity,
    and the patch-all-neurons check."""
    general = read_texts(data_dir / "general_text_test.jsonl")
    if config.eval_max_per_source is not None:
        general = general[: config.eval_max_per_source]
    metrics: dict[str, object] = {
        "splits": list(EVAL_SPLITS), "judge": "neuronguard.models.judge.is_refusal",
        "decoding": f"greedy, {config.eval_new_tokens} new tokens",
        "prompts": f"at most {config.eval_max_per_source} per (source, style) of each split, in file order",
    }
    samples: dict[str, list[dict[str, str]]] = {}
    for name, model in (("unaligned", unaligned), ("aligned", aligned)):
        metrics[name] = {}
        for split in EVAL_SPLITS:
            subset = eval_subset(rows[split], config.eval_max_per_source)
            responses = greedy_responses(model, tokenizer, [conversation(r) for r in subset], config.eval_new_tokens,
                                         config.eval_batch_size, f"eval {name} {split}")
            metrics[name][split] = refusal_report(subset, responses)
            if split == "test":
                samples[name] = [{"source": r["source"], "prompt": r["prompt"], "response": resp}
                                 for r, resp in _first_per_source(subset, responses)]
        metrics[name]["general_text_perplexity"] = round(
            perplexity(model, tokenizer, general, max_tokens=config.train_max_tokens, batch_size=config.eval_batch_size).value, 4
        )
    metrics["samples"] = samples
    check = [conversation(r) for r in rows["test"][: config.patch_check_prompts]]
    metrics["patch_all_neurons_max_abs_logit_diff"] = patch_all_max_diff(unaligned, aligned, tokenizer, check)
    return metrics


def _first_per_source(rows: list[dict[str, str]], responses: list[str]) -> Iterator[tuple[dict[str, str], str]]:
    seen: set[str] = set()
    for row, response in zip(rows, responses):
        if row["source"] not in seen:
            seen.add(row["source"])
            yield row, response


def _data_summary(data_dir: Path) -> dict[str, object]:
    sizes: dict[str, dict[str, int]] = {}
    for split in ("train", "dev", "test", "heldout"):
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
