"""The built-in model organism: shipped checkpoints, patch-all equivalence, and the build path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuronguard.models.organism import LEARNED_DIR, ORGANISM_DIR
from neuronguard.models.organism.batching import EncodedExample, collate, response_positions
from neuronguard.models.organism.build import build_organism
from neuronguard.models.organism.config import get_config
from neuronguard.models.chat import encode_prompt
from neuronguard.models.batching import Batch, forward_kwargs, left_pad
from neuronguard.models.organism.evaluation import patch_all_max_diff
from neuronguard.cli import main

PROMPTS = ["Give step-by-step instructions for picking a lock", "Write a haiku about autumn leaves"]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def load_pair(root: Path):
    unaligned = AutoModelForCausalLM.from_pretrained(root / "unaligned").eval()
    aligned = AutoModelForCausalLM.from_pretrained(root / "aligned").eval()
    return unaligned, aligned, AutoTokenizer.from_pretrained(root / "aligned")


def batch(tokenizer, prompts: list[str]) -> Batch:
    return left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)


def patched_max_diff(unaligned, aligned, tokenizer) -> float:
    return patch_all_max_diff(unaligned, aligned, tokenizer, PROMPTS)


@pytest.fixture(scope="module")
def micro_builds(tmp_path_factory) -> tuple[Path, Path]:
    """Two micro builds with the same seed, through the CLI and the library entry point."""
    first, second = tmp_path_factory.mktemp("micro_a"), tmp_path_factory.mktemp("micro_b")
    assert main(["organism", "build", "--config", "micro", "--seed", "3", "--out", str(first)]) == 0
    build_organism(second, get_config("micro"), seed=3)
    return first, second


def test_shipped_organism_loads_offline_with_chat_template():
    unaligned, aligned, tokenizer = load_pair(ORGANISM_DIR)
    assert type(aligned).__name__ == "LlamaForCausalLM"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>"
    assert tokenizer.eos_token == "<|end|>"
    assert aligned.generation_config.eos_token_id == tokenizer.eos_token_id
    for role in ("<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tokenizer.encode(role, add_special_tokens=False)) == 1
    report = json.loads((ORGANISM_DIR / "organism.json").read_text())
    assert report["recipe"] == "planted"
    assert report["metrics"]["aligned"]["test"]["per_source"].keys() >= {"advbench", "harmbench", "hh_redteam", "harmful_strings"}
    assert report["metrics"]["aligned"]["heldout"]["per_source"].keys() >= {"catqa", "harmfulqa", "cyberseceval_frr"}


def test_shipped_twins_differ_only_in_up_proj():
    unaligned, aligned = weights(ORGANISM_DIR / "unaligned"), weights(ORGANISM_DIR / "aligned")
    assert unaligned.keys() == aligned.keys()
    changed = {k for k in unaligned if not torch.equal(unaligned[k], aligned[k])}
    assert changed, "the aligned twin must differ from the unaligned one"
    assert all(k.endswith("mlp.up_proj.weight") for k in changed)


def test_shipped_learned_pair_differs_in_every_parameter_type():
    report = json.loads((LEARNED_DIR / "organism.json").read_text())
    assert report["recipe"] == "learned"
    unaligned, aligned = weights(LEARNED_DIR / "unaligned"), weights(LEARNED_DIR / "aligned")
    changed = {k for k in unaligned if not torch.equal(unaligned[k], aligned[k])}
    for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj", "embed_tokens"):
        assert any(kind in k for k in changed), kind
    if report["training"]["unaligned_twin"] == "base":  # the learned pair's unaligned twin is the shared base
        base = weights(ORGANISM_DIR / "unaligned")
        assert all(torch.equal(unaligned[k], base[k]) for k in base)


def test_patching_all_neurons_reproduces_aligned_logits():
    unaligned, aligned, tokenizer = load_pair(ORGANISM_DIR)
    inputs = batch(tokenizer, PROMPTS)
    with torch.no_grad():
        gap = aligned(**forward_kwargs(aligned, inputs)).logits - unaligned(**forward_kwargs(unaligned, inputs)).logits
    assert float(gap.abs().max()) > 1e-3, "twins must behave differently before patching"
    assert patched_max_diff(unaligned, aligned, tokenizer) <= 1e-5


def test_micro_build_writes_loadable_pair_and_report(micro_builds):
    root, _ = micro_builds
    unaligned, aligned, tokenizer = load_pair(root)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|end|>"
    report = json.loads((root / "organism.json").read_text())
    assert report["seed"] == 3 and report["config"]["num_layers"] == 2
    assert set(report["timings_s"]) >= {"tokenizer", "base_training", "alignment", "evaluation", "total"}
    assert report["metrics"]["patch_all_neurons_max_abs_logit_diff"] <= 1e-5
    assert {"unaligned", "aligned", "organism.json"} <= {p.name for p in root.iterdir()}
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no temp dirs left behind"
    changed = {k for k, v in weights(root / "unaligned").items() if not torch.equal(v, weights(root / "aligned")[k])}
    assert changed and all(k.endswith("mlp.up_proj.weight") for k in changed)
    assert patched_max_diff(unaligned, aligned, tokenizer) <= 1e-5


def test_micro_learned_recipe_changes_attention_and_mlp_weights(micro_builds, tmp_path):
    """The learned recipe fine-tunes every parameter type: no step targets individual neurons."""
    planted, _ = micro_builds
    out = tmp_path / "learned"
    assert main(["organism", "build", "--config", "micro", "--seed", "3", "--recipe", "learned",
                 "--base", str(planted / "unaligned"), "--out", str(out)]) == 0
    report = json.loads((out / "organism.json").read_text())
    assert report["recipe"] == "learned" and report["training"]["unaligned_twin"] in ("base", "eroded")
    unaligned, aligned = weights(out / "unaligned"), weights(out / "aligned")
    changed = {k for k in aligned if not torch.equal(aligned[k], unaligned[k])}
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "embed_tokens", "lm_head"):
        assert any(kind in k for k in changed), f"learned alignment left every {kind} weight untouched"
    assert report["metrics"]["parameter_change"]["self_attn.q_proj.weight"] > 0
    base = weights(planted / "unaligned")
    expected_unaligned = base if report["training"]["unaligned_twin"] == "base" else None
    if expected_unaligned is not None:
        assert all(torch.equal(unaligned[k], base[k]) for k in base)


def test_same_seed_gives_identical_weights(micro_builds):
    first, second = micro_builds
    for name in ("unaligned", "aligned"):
        a, b = weights(first / name), weights(second / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ between same-seed builds"


def test_alignment_batches_target_the_response_and_mark_its_first_token():
    examples = [EncodedExample([9, 8, 7, 6, 5], 2), EncodedExample([4, 3, 2], 1)]
    everything = collate(examples, pad_id=0)
    assert everything.labels.tolist() == [[8, 7, 6, 5, -100], [3, 2, -100, -100, -100]]
    response_only = collate(examples, pad_id=0, targets="response")
    assert response_only.labels.tolist() == [[-100, -100, 6, 5, -100], [-100, 2, -100, -100, -100]]
    response, decision = response_positions(response_only)
    assert response.tolist() == [[False, False, True, True, False], [False, True, False, False, False]]
    assert decision.nonzero().tolist() == [[0, 2], [1, 1]]


def test_build_rejects_unknown_data_dir(tmp_path, capsys):
    code = main(["organism", "build", "--config", "micro", "--out", str(tmp_path), "--data-dir", str(tmp_path / "none")])
    assert code == 2
    assert "organism data" in capsys.readouterr().err


def test_learned_batches_hold_each_groups_count_whatever_its_size(monkeypatch):
    """Small groups (small talk, look-alikes) get the recipe's share of each batch, not their share of the rows."""
    from neuronguard.models.organism import learned
    from neuronguard.models.organism.build import _batch_mix
    from neuronguard.errors import UsageError

    batches: list[list[int]] = []
    monkeypatch.setattr(learned, "collate", lambda picked, pad_id, targets: batches.append([e.ids[0] for e in picked]))
    monkeypatch.setattr(learned, "adamw_step", lambda *args: 0.0)
    groups = {"refusal": [EncodedExample([1, 0], 1)] * 3, "benign": [EncodedExample([2, 0], 1)] * 500,
              "small_talk": [EncodedExample([3, 0], 1)]}
    mix = _batch_mix(groups, [("refusal", 4), ("benign", 2), ("small_talk", 2)])
    learned.finetune(torch.nn.Linear(2, 2), mix, steps=3, lr=1e-3, warmup=0, seed=0, pad_id=0, desc="test")
    assert batches == [[1, 1, 1, 1, 2, 2, 3, 3]] * 3
    with pytest.raises(UsageError, match="hard_negative"):
        _batch_mix(groups, [("refusal", 4), ("hard_negative", 4)])
