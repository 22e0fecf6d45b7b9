"""Measure the organism: refusal rates with greedy decoding and the keyword judge, and the
patch-all-neurons equivalence check (perplexity is `neuronguard.models.perplexity`'s)."""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.chat import Request, encode_prompt
from neuronguard.models.batching import forward_kwargs, left_pad
from neuronguard.models.hooks import capture, patch
from neuronguard.models.judge import is_refusal
from neuronguard.models.sites import resolve_sites
from neuronguard.models.organism.sources import HARMFUL


@torch.no_grad()
def greedy_responses(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[Request],
    new_tokens: int,
    batch_size: int,
    desc: str,
) -> list[str]:
    """Greedy completions, batched by prompt length; returned in the order of `prompts`."""
    encoded = [encode_prompt(tokenizer, p)[-(model.config.max_position_embeddings - new_tokens) :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        picked = order[start : start + batch_size]
        batch = left_pad([encoded[i] for i in picked], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, row in zip(picked, out[:, batch.input_ids.shape[1] :]):
            responses[i] = tokenizer.decode(row, skip_special_tokens=True)
    return responses


def refusal_report(rows: list[dict], responses: list[str]) -> dict[str, object]:
    """Refusal rate over harmful prompts and over benign ones (false refusals), and per source,
    per attack style and per benign group (plain benign, hard negatives, small talk)."""
    cells: dict[str, dict[str, list[bool]]] = {"per_source": defaultdict(list), "per_style": defaultdict(list),
                                               "per_group": defaultdict(list)}
    harmful: list[bool] = []
    harmless: list[bool] = []
    for row, response in zip(rows, responses):
        refused = is_refusal(response)
        cells["per_source"][row["source"]].append(refused)
        cells["per_style"][f"{row.get('label')}/{row.get('style', 'plain')}"].append(refused)
        cells["per_group"][str(row.get("group", row.get("label")))].append(refused)
        (harmful if row["label"] == HARMFUL else harmless).append(refused)
    return {
        "harmful_refusal_rate": _rate(harmful),
        "harmless_false_refusal_rate": _rate(harmless),
        **{kind: {k: {"n": len(v), "refusal_rate": _rate(v)} for k, v in sorted(table.items())} for kind, table in cells.items()},
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
    }


def eval_subset(rows: list[dict], per_cell: int | None) -> list[dict]:
    """At most `per_cell` rows of each (source, style), in file order: every source and style is
    measured without the large sources dominating the cost."""
    if per_cell is None:
        return rows
    counts: dict[tuple[str, str], int] = defaultdict(int)
    kept = []
    for row in rows:
        cell = (str(row["source"]), str(row.get("style", "plain")))
        if counts[cell] < per_cell:
            counts[cell] += 1
            kept.append(row)
    return kept


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


@torch.no_grad()
def patch_all_max_diff(
    unaligned: LlamaForCausalLM, aligned: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[Request]
) -> float:
    """Max |logit| difference between the aligned model and the unaligned one with every neuron patched."""
    batch = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    selection = NeuronSelection.all(resolve_sites(aligned))
    with capture(aligned, selection) as cap:
        aligned_logits = aligned(**forward_kwargs(aligned, batch)).logits
    with patch(unaligned, selection, values=cap.activations()):
        patched_logits = unaligned(**forward_kwargs(unaligned, batch)).logits
    return float((aligned_logits - patched_logits).abs().max())


def neuron_change_summary(scales: torch.Tensor) -> dict[str, float]:
    """How concentrated the alignment change is: share of total |s - 1| in the top 1% / 5% of neurons."""
    change = (scales - 1).abs().flatten()
    ranked = change.sort(descending=True).values
    total = float(ranked.sum()) or 1.0
    n = ranked.numel()
    return {
        "num_neurons": n,
        "top1pct_change_share": float(ranked[: max(1, n // 100)].sum()) / total,
        "top5pct_change_share": float(ranked[: max(1, n // 20)].sum()) / total,
        "max_abs_scale_change": float(ranked[0]),
        "neurons_changed_over_0.1": int((change > 0.1).sum()),
    }
