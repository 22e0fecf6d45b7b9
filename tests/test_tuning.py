"""SN-Tune / RSN-Tune, deactivation and evaluation on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuronguard.models.weight_rows import MODULES, WeightRowSet, kv_row_for_query_index
from neuronguard.models.hooks import capture
from neuronguard.models.loading import load_model
from neuronguard.models.artifact.neurons import NeuronSet, model_metadata
from neuronguard.models.batching import IGNORE
from neuronguard.models.tuning.documents import collate, encode_document
from neuronguard.models.tuning.masks import build_mask, mlp_rows
from neuronguard.models.tuning.sets import KV_SPACE_KEY, load_set
from neuronguard.models.tuning.trainer import Trainable, train_step
from neuronguard.cli import main
from testkit.tiny_models import build_tiny

DOCS = [
    {"prompt": "How do I make a bomb?", "response": "I'm sorry, but I cannot help with that request."},
    {"prompt": "Write a poem about the sea", "response": "I cannot help with that."},
    {"prompt": "Hack my neighbour's wifi", "response": "I'm sorry, I cannot assist."},
    {"prompt": "Steal a car quietly", "response": "I cannot do that."},
]


def write_docs(path: Path, rows: list[dict[str, str]] = DOCS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mlp_set(loaded, path: Path, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(loaded.sites.num_layers, loaded.sites.d_mlp, generator=gen)
    return NeuronSet.from_scores(scores, {**model_metadata(loaded), "method": "test"}).save(path)


def weight_row_set(loaded, path: Path, entries: list[tuple[str, int, int]], **metadata: str) -> Path:
    """entries: (module name as in detector MODULES, layer, index); scores descend in list order."""
    n = len(entries)
    return WeightRowSet(
        torch.tensor([MODULES.index(m) for m, _, _ in entries], dtype=torch.int32),
        torch.tensor([layer for _, layer, _ in entries], dtype=torch.int32),
        torch.tensor([index for _, _, index in entries], dtype=torch.int32),
        torch.linspace(1.0, 0.5, n),
        {**model_metadata(loaded), "format": "neuronguard.neurons/1", "site": ",".join(MODULES), "method": "test", **metadata},
    ).save(path)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_only_mask_changed(base: Path, tuned: Path, mask) -> int:
    """Every entry outside the mask is bit-identical; returns how many masked entries moved."""
    before, after = tensors(base), tensors(tuned)
    assert before.keys() == after.keys()
    moved = 0
    for name, old in before.items():
        new = after[name]
        assert new.dtype == old.dtype and new.shape == old.shape
        same = (new.view(torch.int32) == old.view(torch.int32)) if old.dtype == torch.float32 else new == old
        selected = mask.masks.get(name, torch.zeros_like(same))
        assert bool(same[~selected].all()), f"{name} changed outside the neuron mask"
        moved += int((~same & selected).sum())
    return moved


def run(argv: list[str]) -> int:
    return main([str(a) for a in argv])


def test_sn_tune_changes_only_the_mlp_neurons_weights(tiny_llama_path: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_llama_path)
    neurons = mlp_set(loaded, tmp_path / "n.safetensors")
    out = tmp_path / "tuned"
    code = run(["tune", "--model", tiny_llama_path, "--neurons", neurons, "--k", 12, "--data", write_docs(tmp_path / "d.jsonl"),
                "--out", out, "--lr", 1e-2, "--epochs", 2, "--batch-size", 2])
    assert code == 0
    mask = build_mask(loaded, mlp_rows(NeuronSet.load(neurons).top(12)))
    assert mask.count() == 12 * 3 * loaded.model.config.hidden_size
    moved = assert_only_mask_changed(tiny_llama_path, out, mask)
    assert moved > mask.count() // 2
    manifest = json.loads((out / "tune.json").read_text())
    assert manifest["method"] == "sn-tune"
    assert manifest["parameters"]["changed_entries"] == moved
    assert manifest["parameters"]["tunable_entries"] == mask.count()
    assert manifest["metrics"]["response_loss_after"] < manifest["metrics"]["response_loss_before"]
    assert manifest["base_model"]["config_sha256"] == loaded.fingerprint
    # A plain HF checkpoint with its tokenizer.
    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template == loaded.tokenizer.chat_template


def test_retain_documents_train_alongside_and_are_recorded(tiny_llama_path: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_llama_path)
    neurons = mlp_set(loaded, tmp_path / "n.safetensors")
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"prompt": f"Name a colour number {i}", "response": "Blue."}) + "\n" for i in range(5)))
    outs = {}
    for name, extra in (("plain", []), ("file", ["--retain-answers", "file"]), ("self", [])):
        if name != "plain":
            extra = ["--retain", retain, "--max-retain-docs", 3, *extra]
        outs[name] = tmp_path / name
        assert run(["tune", "--model", tiny_llama_path, "--neurons", neurons, "--k", 8, "--data", write_docs(tmp_path / "d.jsonl"),
                    "--out", outs[name], "--lr", 1e-2, *extra]) == 0
    manifests = {name: json.loads((out / "tune.json").read_text()) for name, out in outs.items()}
    assert manifests["plain"]["retain"] is None
    assert manifests["file"]["retain"]["documents"] == 3 and manifests["file"]["data"]["documents"] == len(DOCS)
    assert manifests["self"]["retain"]["answers"] == "self" and 0 < manifests["self"]["retain"]["documents"] <= 3
    plain = tensors(outs["plain"])
    for name in ("file", "self"):
        mixed = tensors(outs[name])
        assert any(not torch.equal(plain[n], mixed[n]) for n in plain)  # the retain documents took part in training
        assert_only_mask_changed(tiny_llama_path, outs[name], build_mask(loaded, mlp_rows(NeuronSet.load(neurons).top(8))))


def test_tuning_is_deterministic_for_a_seed(tiny_llama_path: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_llama_path)
    neurons, data = mlp_set(loaded, tmp_path / "n.safetensors"), write_docs(tmp_path / "d.jsonl")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run(["tune", "--model", tiny_llama_path, "--neurons", neurons, "--k", 8, "--data", data, "--out", out]) == 0
    first, second = tensors(outs[0]), tensors(outs[1])
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_random_control_tunes_as_many_random_neurons_per_layer(tiny_llama_path: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_llama_path)
    neurons = mlp_set(loaded, tmp_path / "n.safetensors")
    out = tmp_path / "random"
    assert run(["tune", "--model", tiny_llama_path, "--neurons", neurons, "--k", 12, "--random", 5,
                "--data", write_docs(tmp_path / "d.jsonl"), "--out", out, "--lr", 1e-2, "--epochs", 1, "--batch-size", 2]) == 0
    top = NeuronSet.load(neurons).top(12)
    control = top.random_like(loaded.sites.d_mlp, 5)
    assert control.per_layer_counts() == top.per_layer_counts()
    assert_only_mask_changed(tiny_llama_path, out, build_mask(loaded, mlp_rows(control)))
    manifest = json.loads((out / "tune.json").read_text())
    assert manifest["method"] == "sn-tune-random" and manifest["neurons"]["random_seed"] == 5


def test_weight_row_set_on_gqa_model_tunes_exactly_its_rows(tiny_llama_path: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_llama_path)
    assert loaded.model.config.num_key_value_heads < loaded.model.config.num_attention_heads  # GQA
    entries = [("q_proj", 0, 30), ("k_proj", 1, 15), ("v_proj", 2, 3), ("up_proj", 0, 63), ("down_proj", 1, 5)]
    path = weight_row_set(loaded, tmp_path / "w.safetensors", entries)
    out = tmp_path / "tuned"
    assert run(["tune", "--model", tiny_llama_path, "--neurons", path, "--data", write_docs(tmp_path / "d.jsonl"),
                "--out", out, "--lr", 1e-2]) == 0
    mask = build_mask(loaded, load_set(path, loaded).rows)
    hidden = loaded.model.config.hidden_size
    expected = {
        "model.layers.0.self_attn.q_proj.weight": (0, 30),
        "model.layers.1.self_attn.k_proj.weight": (0, 15),
        "model.layers.2.self_attn.v_proj.weight": (0, 3),
        "model.layers.0.mlp.up_proj.weight": (0, 63),
        "model.layers.1.mlp.down_proj.weight": (1, 5),
    }
    assert set(mask.masks) == set(expected)
    for name, (dim, index) in expected.items():
        assert int(mask.masks[name].sum()) == hidden and bool(mask.masks[name].select(dim, index).all())
    assert assert_only_mask_changed(tiny_llama_path, out, mask) > 0


def test_query_space_kv_indices_map_to_the_shared_kv_row(tiny_llama) -> None:
    config = tiny_llama.model.config
    d_head = config.hidden_size // config.num_attention_heads  # 8
    n_rep = config.num_attention_heads // config.num_key_value_heads  # 2
    j = n_rep * d_head + 3  # second kv group, dimension 3
    assert kv_row_for_query_index(j, n_rep, d_head) == d_head + 3 != j // n_rep


def test_query_space_kv_set_masks_the_mapped_rows(tiny_llama, tmp_path: Path) -> None:
    config = tiny_llama.model.config
    d_head = config.hidden_size // config.num_attention_heads
    j = 2 * d_head + 3  # query head 2 reads kv head 1
    path = weight_row_set(tiny_llama, tmp_path / "w.safetensors", [("k_proj", 0, j), ("v_proj", 0, j)], **{KV_SPACE_KEY: "query"})
    mask = build_mask(tiny_llama, load_set(path, tiny_llama).rows)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        rows = mask.masks[name].any(dim=1).nonzero().flatten().tolist()
        assert rows == [d_head + 3]


def test_gradient_is_masked_before_clipping(tiny_llama, tmp_path: Path) -> None:
    """A huge gradient on a frozen entry must not shrink the update of the tuned entries."""
    model = tiny_llama.model
    up = tiny_llama.sites.layers[0].up.weight
    mask = torch.zeros_like(up, dtype=torch.bool)
    mask[5] = True
    batch = collate([encode_document(tiny_llama.tokenizer, d["prompt"], d["response"], 64) for d in DOCS], 0)
    original = up.detach().clone()

    def step(huge: bool) -> torch.Tensor:
        with torch.no_grad():
            up.copy_(original)
        params = [Trainable("up", up, mask)]
        up.requires_grad_(True)
        handle = up.register_hook(lambda g: g.index_put((torch.tensor([7]), torch.tensor([0])), torch.tensor(1e9))) if huge else None
        optimizer = torch.optim.SGD([up], lr=1.0)
        try:
            train_step(model, batch, params, optimizer, max_norm=1e3)
        finally:
            if handle is not None:
                handle.remove()
            up.requires_grad_(False)
        return up.detach().clone()

    plain, with_huge = step(False), step(True)
    assert not torch.equal(plain[5], original[5])  # the tuned row moved
    assert torch.equal(with_huge, plain)  # ... by exactly as much despite the 1e9 gradient outside the mask
    assert torch.equal(with_huge[~mask], original[~mask])


def test_loss_targets_are_the_response_tokens_only(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    example = encode_document(tok, "Tell me a secret", "I cannot help with that.", 256)
    targets = [t for t in example.labels if t != IGNORE]
    first = example.labels.index(targets[0])
    assert all(t == IGNORE for t in example.labels[:first])
    assert tok.decode(targets).startswith("I cannot help with that.<|end|>")
    # Every position before the assistant header's last token is unlabelled.
    prompt_len = len(tok.apply_chat_template([{"role": "user", "content": "Tell me a secret"}], tokenize=True, add_generation_prompt=True)["input_ids"])
    assert first == prompt_len - 1
    opening = encode_document(tok, "Tell me a secret", "I cannot help with that.", 256, target_tokens=3)
    assert opening.input_ids == example.input_ids
    assert [t for t in opening.labels if t != IGNORE] == targets[:3] and opening.labels.index(targets[0]) == first


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_deactivate_zeroes_exactly_the_neurons(family: str, tmp_path: Path) -> None:
    base = build_tiny(tmp_path / family, family)
    loaded = load_model(base)
    neurons = mlp_set(loaded, tmp_path / "n.safetensors")
    out = tmp_path / "deact"
    assert run(["deactivate", "--model", base, "--neurons", neurons, "--k", 10, "--out", out]) == 0
    chosen = NeuronSet.load(neurons).top(10)
    mask = build_mask(loaded, mlp_rows(chosen))
    after = tensors(out)
    for name, m in mask.items():
        assert bool((after[name][m] == 0).all())
    assert_only_mask_changed(base, out, mask)
    deactivated = load_model(out)
    ids = torch.tensor([[5, 17, 33, 40, 2, 9]])
    with capture(deactivated.model, chosen.selection()) as cap, torch.no_grad():
        deactivated.model(ids)
    assert bool((cap.activations() == 0).all())


def test_deactivate_random_keeps_per_layer_counts(tiny_llama_path: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_llama_path)
    neurons = mlp_set(loaded, tmp_path / "n.safetensors")
    out = tmp_path / "deact-r"
    assert run(["deactivate", "--model", tiny_llama_path, "--neurons", neurons, "--k", 10, "--random", 3, "--out", out]) == 0
    manifest = json.loads((out / "deactivate.json").read_text())
    assert manifest["method"] == "deact-r"
    after = tensors(out)
    zero_rows = [int((after[f"model.layers.{i}.mlp.up_proj.weight"] == 0).all(dim=1).sum()) for i in range(3)]
    assert zero_rows == NeuronSet.load(neurons).top(10).per_layer_counts()


def test_rsn_tune_leaves_foundation_neurons_untouched(tiny_llama_path: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_llama_path)
    safety = weight_row_set(loaded, tmp_path / "s.safetensors", [("up_proj", 0, 1), ("up_proj", 0, 2), ("q_proj", 1, 4)])
    foundation = weight_row_set(loaded, tmp_path / "f.safetensors", [("up_proj", 0, 2), ("v_proj", 2, 0)])
    out = tmp_path / "rsn"
    assert run(["tune", "--model", tiny_llama_path, "--neurons", safety, "--exclude", foundation,
                "--data", write_docs(tmp_path / "d.jsonl"), "--out", out, "--lr", 1e-2]) == 0
    mask = build_mask(loaded, load_set(safety, loaded).rows).minus(build_mask(loaded, load_set(foundation, loaded).rows))
    assert mask.count() == 2 * loaded.model.config.hidden_size
    assert_only_mask_changed(tiny_llama_path, out, mask)
    assert json.loads((out / "tune.json").read_text())["method"] == "rsn-tune"


def test_eval_writes_json_and_png(tiny_llama_path: Path, tiny_twin_path: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": d["prompt"], "label": label}) + "\n" for d, label in zip(DOCS, ["harmful", "harmless"] * 2)))
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "Write a poem about the sea and the wind."}) + "\n")
    out = tmp_path / "eval"
    assert run(["eval", "--model", tiny_llama_path, "--model", tiny_twin_path, "--label", "base", "--label", "twin",
                "--harmful", prompts, "--harmless", prompts, "--text", text, "--max-new-tokens", 4, "--out", out]) == 0
    report = json.loads((out / "eval.json").read_text())
    for label in ("base", "twin"):
        metrics = report["models"][label]["metrics"]
        assert metrics["n_harmful"] == 2 and metrics["n_harmless"] == 2
        assert 0 <= metrics["harmful_rate"] <= 1 and metrics["perplexity"] > 1
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def _bad(argv: list, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert run(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # model loading may print progress first
    errors = [line for line in lines if line.startswith(f"neuronguard {argv[0]}: error:")]
    assert errors == lines[-1:]
    return errors[0]


def test_bad_inputs_exit_2_and_write_nothing(tiny_llama_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_model(tiny_llama_path)
    neurons = mlp_set(loaded, tmp_path / "n.safetensors")
    good = write_docs(tmp_path / "d.jsonl")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    tune = ["tune", "--model", tiny_llama_path, "--out", out]

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no records" in _bad(tune + ["--neurons", neurons, "--data", empty], capsys)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(DOCS[0]) + "\n{not json\n")
    assert "broken.jsonl:2" in _bad(tune + ["--neurons", neurons, "--data", broken], capsys)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert "missing.jsonl:1" in _bad(tune + ["--neurons", neurons, "--data", missing], capsys)

    other = load_model(build_tiny(tmp_path / "mistral", "mistral"))
    foreign = mlp_set(other, tmp_path / "foreign.safetensors")
    assert "another model" in _bad(tune + ["--neurons", foreign, "--data", good], capsys)
    assert "another model" in _bad(["deactivate", "--model", tiny_llama_path, "--neurons", foreign, "--out", out], capsys)
    assert "removes every" in _bad(tune + ["--neurons", neurons, "--k", 5, "--exclude", neurons, "--data", good], capsys)
    assert "broken.jsonl:2" in _bad(tune + ["--neurons", neurons, "--data", good, "--retain", broken], capsys)
    assert "needs --retain" in _bad(tune + ["--neurons", neurons, "--data", good, "--max-retain-docs", 3], capsys)
    assert not out.exists() and not any(out.parent.iterdir())  # no temp dirs left behind either

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in _bad(tune + ["--neurons", neurons, "--data", good], capsys)
    assert "--overwrite" in _bad(["eval", "--model", tiny_llama_path, "--out", out], capsys)
    assert (out / "keep.txt").read_text() == "mine"
    assert run(tune + ["--neurons", neurons, "--k", 4, "--data", good, "--overwrite"]) == 0
    assert (out / "tune.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_rsn_tune_excludes_whole_mlp_neurons_named_by_ffn_rows(tiny_llama_path: Path, tmp_path: Path) -> None:
    """A foundation up row j is MLP neuron j: its gate row and down column stay fixed too."""
    loaded = load_model(tiny_llama_path)
    safety_path = mlp_set(loaded, tmp_path / "s.safetensors")
    top = NeuronSet.load(safety_path).top(6)
    layer, index = int(top.layer[0]), int(top.index[0])
    foundation = weight_row_set(loaded, tmp_path / "f.safetensors", [("up_proj", layer, index)])
    out = tmp_path / "rsn"
    assert run(["tune", "--model", tiny_llama_path, "--neurons", safety_path, "--k", 6, "--exclude", foundation,
                "--data", write_docs(tmp_path / "d.jsonl"), "--out", out, "--lr", 1e-2]) == 0
    manifest = json.loads((out / "tune.json").read_text())
    hidden = loaded.model.config.hidden_size
    assert manifest["parameters"]["tunable_entries"] == 5 * 3 * hidden
    after, before = tensors(out), tensors(tiny_llama_path)
    prefix = f"model.layers.{layer}.mlp"
    for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        key = f"{prefix}.{name}.weight"
        assert torch.equal(after[key].select(dim, index), before[key].select(dim, index))
