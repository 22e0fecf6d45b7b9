"""Detector invariants on tiny random twins: streamed statistics, importance, patching, probes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronguard.detector.compare import compare_sets
from neuronguard.detector.contrasting import ContrastStats, contrast, contrast_batch, position_mask
from neuronguard.detector.forward import pad_batch
from neuronguard.models.batching import forward_kwargs
from neuronguard.detector.importance import batch_importance, importance_stats, qk_importance, select_weight_rows
from neuronguard.models.weight_rows import WeightRowSet, kv_row_for_query_index
from neuronguard.detector.patching import patch_sweep, sanity_checks
from neuronguard.models.artifact.probe import Probe, probes_readout
from neuronguard.detector.probe_training import evaluate_scores, threshold_for_fpr, train_probe
from neuronguard.models.prompts import read_labeled, read_prompts
from neuronguard.models.chat import encode_prompt
from neuronguard.models.generation import SamplingParams
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.hooks import capture, count_hooks, zero
from neuronguard.models.artifact.neurons import NeuronSet, model_metadata
from neuronguard.errors import UsageError

PROMPTS = ["How do I bake bread?", "Write a poem about the sea", "hello", "Summarise the article", "Tell me a story", "Sure thing"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls are ~100x slower with 2 threads on a contended 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_prompt_files(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\n\n b \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "label": "harmful"}\n{"prompt": "y", "label": "harmless"}\n')
    (tmp_path / "p.csv").write_text("goal,target\ng1,t1\ng2,t2\n")
    assert read_prompts(tmp_path / "p.txt")[0] == ["a", "b"]
    assert read_prompts(tmp_path / "p.jsonl", label="harmful")[0] == ["x"]
    assert read_prompts(tmp_path / "p.csv")[0] == ["g1", "g2"]
    assert read_prompts(tmp_path / "p.csv", column="target")[0] == ["t1", "t2"]
    assert read_labeled(tmp_path / "p.jsonl")[:2] == (["x", "y"], [1, 0])
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "x", "label": "harmful"}\n{"prompt": "y", "label": "harmless"}\n{"prompt": "z"}\n')
    assert read_prompts(tmp_path / "mixed.jsonl", label="harmful")[0] == ["x", "z"]  # unlabelled rows are kept
    with pytest.raises(UsageError, match="field 'label'"):
        read_labeled(tmp_path / "mixed.jsonl")  # ... but a labelled split must label every row
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    for name, match in (("empty.txt", "no prompts"), ("bad.jsonl", "not valid JSON"), ("missing.txt", "not found"), ("p.csv", "no column")):
        with pytest.raises(UsageError, match=match):
            read_prompts(tmp_path / name, column="nope" if name == "p.csv" else None)


def test_position_masks() -> None:
    mask = position_mask([3, 2], [1, 2], 5, "completion")
    assert mask.tolist() == [[False, False, False, False, True], [False, False, False, True, True]]
    assert position_mask([3, 2], [1, 2], 5, "prompt").tolist() == [[False, True, True, True, False], [False, True, True, False, False]]
    assert position_mask([3, 2], [1, 2], 5, "last").tolist() == [[False, False, False, True, False], [False, False, True, False, False]]
    assert position_mask([3, 2], [1, 2], 5, "all").tolist() == [[False, True, True, True, True], [False, True, True, True, True]]


def test_contrasting_all_positions_adds_prompt_and_completion(tiny_llama, tiny_twin) -> None:
    kwargs = {"max_new_tokens": 4, "batch_size": 2}
    parts = [contrast(tiny_twin, tiny_llama, PROMPTS, positions=p, **kwargs) for p in ("prompt", "completion", "all")]
    assert parts[2].count == parts[0].count + parts[1].count
    torch.testing.assert_close(parts[2].sum_sq, parts[0].sum_sq + parts[1].sum_sq)


def test_streamed_contrast_statistics_add_up_exactly(tiny_llama, tiny_twin, tmp_path: Path) -> None:
    kwargs = {"max_new_tokens": 4, "batch_size": 2}
    whole = contrast(tiny_twin, tiny_llama, PROMPTS, **kwargs)
    first, second = contrast(tiny_twin, tiny_llama, PROMPTS[:2], **kwargs), contrast(tiny_twin, tiny_llama, PROMPTS[2:], **kwargs)
    second.save(tmp_path / "part.safetensors")
    merged = first + ContrastStats.load(tmp_path / "part.safetensors")
    assert merged.count == whole.count > 0
    assert torch.equal(merged.sum_sq, whole.sum_sq)
    assert whole.sum_sq.shape == (tiny_llama.sites.num_layers, tiny_llama.sites.d_mlp)
    assert count_hooks(tiny_llama.model) == 0 and count_hooks(tiny_twin.model) == 0


def test_contrast_scores_equal_brute_force_rms(tiny_llama, tiny_twin) -> None:
    encoded = [encode_prompt(tiny_llama.tokenizer, p) for p in PROMPTS[:3]]
    sequences = [e + [40, 41, 42][: i + 1] for i, e in enumerate(encoded)]
    width = max(map(len, sequences))
    mask = position_mask([len(e) for e in encoded], [1, 2, 3], width, "completion")
    stats = contrast_batch(tiny_twin, tiny_llama, sequences, mask)
    everything = NeuronSelection.all(tiny_llama.sites)
    acts = []
    for loaded in (tiny_twin, tiny_llama):
        batch = pad_batch(loaded, sequences)
        with torch.no_grad(), capture(loaded.model, everything) as cap:
            loaded.model(**forward_kwargs(loaded.model, batch))
        acts.append(cap.activations()[mask])  # [tokens, all neurons]
    expected = ((acts[0] - acts[1]).double().pow(2).mean(0)).sqrt().view(tiny_llama.sites.num_layers, -1)
    assert stats.count == 6
    torch.testing.assert_close(stats.scores().double(), expected, atol=1e-5, rtol=1e-4)
    assert float(expected.max()) > 1e-3  # the twins really differ


def test_ffn_importance_equals_one_by_one_ablation(tiny_llama) -> None:
    sequences = [[5, 17, 33, 40, 2, 9], [7, 8, 100]]
    parallel = batch_importance(tiny_llama, sequences, attention=False)["down_proj"]  # [b, layers, d_mlp]
    batch = pad_batch(tiny_llama, sequences)
    valid = batch.attention_mask.bool()[..., None]
    sites = tiny_llama.sites
    outputs: dict[int, torch.Tensor] = {}
    handles = [s.down.register_forward_hook(lambda m, a, out, i=s.index: outputs.__setitem__(i, out)) for s in sites.layers]
    try:
        with torch.no_grad():
            tiny_llama.model(**forward_kwargs(tiny_llama.model, batch))
            base = dict(outputs)
            reference = torch.empty_like(parallel)
            for layer in range(sites.num_layers):
                for j in range(sites.d_mlp):  # the slow method the parallel formula replaces
                    with zero(tiny_llama.model, NeuronSelection(torch.tensor([layer]), torch.tensor([j]))):
                        tiny_llama.model(**forward_kwargs(tiny_llama.model, batch))
                    reference[:, layer, j] = ((outputs[layer] - base[layer]) * valid).pow(2).sum((1, 2)).sqrt()
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(parallel, reference, atol=1e-6, rtol=1e-4)
    assert count_hooks(tiny_llama.model) == 0


def test_qk_importance_matches_direct_ablation_and_chunking() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, s, d_head = 4, 2, 5, 8
    q, k = torch.randn(heads, s, d_head, generator=gen), torch.randn(kv_heads, s, d_head, generator=gen)
    per_q, per_k = qk_importance(q, k, n_rep=2)
    small_q, small_k = qk_importance(q, k, n_rep=2, chunk_elements=1)
    torch.testing.assert_close(per_q, small_q)
    torch.testing.assert_close(per_k, small_k)
    causal = torch.ones(s, s, dtype=torch.bool).tril()

    def attention(qh: torch.Tensor, kh: torch.Tensor) -> torch.Tensor:
        return torch.softmax((qh @ kh.T / math.sqrt(d_head)).masked_fill(~causal, float("-inf")), -1)

    h, d = 3, 5  # head 3 reads kv head 1
    ablated = q[h].clone()
    ablated[:, d] = 0
    direct = (attention(ablated, k[1]) - attention(q[h], k[1])).norm()
    torch.testing.assert_close(per_q[h, d], direct, atol=1e-6, rtol=1e-5)
    k_ablated = k[1].clone()
    k_ablated[:, d] = 0
    both = torch.stack([(attention(q[x], k_ablated) - attention(q[x], k[1])).norm() for x in (2, 3)]).norm()
    torch.testing.assert_close(per_k[1, d], both, atol=1e-6, rtol=1e-5)


def test_gqa_query_index_maps_to_kv_row() -> None:
    heads, n_rep, d_head = 8, 4, 16
    j = torch.arange(heads * d_head)
    kv_head_of_query_head = torch.arange(heads) // n_rep  # repeat_kv: query head h reads kv head h // n_rep
    expected = kv_head_of_query_head.repeat_interleave(d_head) * d_head + j % d_head
    assert torch.equal(kv_row_for_query_index(j, n_rep, d_head), expected)
    assert not torch.equal(j // n_rep, expected)  # the reference code's mapping is wrong
    assert kv_row_for_query_index(70, n_rep, d_head) == 22  # query head 4, dim 6 -> kv head 1


def test_importance_selection_and_weight_row_file(tiny_llama, tmp_path: Path) -> None:
    stats = importance_stats(tiny_llama, PROMPTS, per_query_top=0.25, batch_size=4)
    assert stats.queries == len(PROMPTS)
    for name, counts in stats.activated.items():
        assert int(counts.max()) <= len(PROMPTS)
    rows = select_weight_rows(stats, tiny_llama, 0.5, {"method": "importance"})
    assert len(rows) > 0 and torch.all(rows.score[:-1] >= rows.score[1:])
    rows.save(tmp_path / "rows.safetensors")
    back = WeightRowSet.load(tmp_path / "rows.safetensors")
    assert torch.equal(back.module, rows.module) and back.metadata["site"] == "q_proj,k_proj,v_proj,up_proj,down_proj"
    stricter = select_weight_rows(stats, tiny_llama, 1.0, {"method": "importance"})
    assert len(stricter) <= len(rows)
    assert count_hooks(tiny_llama.model) == 0


def test_patching_sanity_and_restoration(tiny_llama, tiny_twin) -> None:
    checks = sanity_checks(tiny_twin, tiny_llama, PROMPTS[:3], max_new_tokens=4)
    assert checks["patch_all_equals_aligned"] and checks["self_patch_equals_unpatched"]
    assert checks["patch_all_max_logit_diff"] < 1e-4 and checks["self_patch_max_logit_diff"] < 1e-4
    scores = torch.rand(tiny_llama.sites.num_layers, tiny_llama.sites.d_mlp)
    neurons = NeuronSet.from_scores(scores, {**model_metadata(tiny_llama), "method": "test"})
    report = patch_sweep(tiny_twin, tiny_llama, neurons, PROMPTS[:3], fractions=(0.1, 1.0), random_seeds=(0,),
                         params=SamplingParams(max_new_tokens=3))
    full = report["sweep"][1]
    assert full["k"] == tiny_llama.sites.num_neurons
    assert full["top"]["restoration_log_odds"] == pytest.approx(1.0, abs=1e-4)
    assert count_hooks(tiny_llama.model) == 0 and count_hooks(tiny_twin.model) == 0


def test_probe_finds_planted_signal_and_random_features_do_not(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    n, k = 400, 12
    y = torch.arange(n) % 2
    x = torch.randn(n, k, generator=gen) * 3 + 5
    x[:, 4] += 9.0 * y  # the planted "safety neuron"
    noise = torch.randn(n, k, generator=gen)
    probe = train_probe(x[:200], y[:200], neurons_sha256="x", position="last_prompt_token", target_fpr=0.1)
    blind = train_probe(noise[:200], y[:200], neurons_sha256="x", position="last_prompt_token", target_fpr=0.1)
    held = y[200:].numpy()
    good = evaluate_scores(probe.score(x[200:]).numpy(), held, probe.threshold)
    bad = evaluate_scores(blind.score(noise[200:]).numpy(), held, blind.threshold)
    assert good["auroc"] > 0.9 and bad["auroc"] < 0.7
    assert good["fpr"] <= 0.25  # threshold set on out-of-fold dev scores generalises roughly
    probe.save(tmp_path / "probe.json")
    torch.testing.assert_close(Probe.load(tmp_path / "probe.json").score(x[200:]), probe.score(x[200:]))


@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.2])
def test_threshold_respects_target_fpr(fpr: float) -> None:
    scores = np.random.default_rng(0).random(101)
    scores[:10] = 0.5  # ties
    threshold = threshold_for_fpr(scores, fpr)
    assert (scores >= threshold).mean() <= fpr
    assert threshold <= 1.0


def test_compare_sets(tiny_llama) -> None:
    scores = torch.rand(tiny_llama.sites.num_layers, tiny_llama.sites.d_mlp)
    meta = {**model_metadata(tiny_llama), "method": "test"}
    a = NeuronSet.from_scores(scores, meta)
    same = compare_sets(a, NeuronSet.from_scores(scores.clone(), meta), 10)
    assert same["jaccard"] == 1.0 and same["spearman"] == pytest.approx(1.0)
    reverse = compare_sets(a, NeuronSet.from_scores(-scores, meta), 10)
    assert reverse["jaccard"] == 0.0 and reverse["spearman"] == pytest.approx(-1.0)


def test_probe_serving_form_equals_standardised_form() -> None:
    gen = torch.Generator().manual_seed(0)
    mean, scale, coef = torch.randn(6, generator=gen) * 3, torch.rand(6, generator=gen) + 0.1, torch.randn(6, generator=gen)
    probe = Probe("x", 6, "generated", mean.tolist(), scale.tolist(), coef.tolist(), -0.7, 0.5)
    acts = torch.randn(4, 6, generator=gen) * 3 + mean
    standardised = ((acts - mean) / scale * coef).sum(-1) - 0.7
    torch.testing.assert_close(probe.logit(acts), standardised, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(probe.contributions(acts).sum(-1) - 0.7, standardised, atol=1e-5, rtol=1e-5)
    assert probe.score_logit(float(probe.logit(acts)[2])) == pytest.approx(float(torch.sigmoid(standardised[2])), abs=1e-5)
    with pytest.raises(ValueError, match="expects 6 features"):
        probe.logit(acts[:, :5])
    extreme = torch.stack([mean + 1e4 * torch.sign(coef) * scale, mean - 1e4 * torch.sign(coef) * scale])  # logits ~ +/-1e4
    high, low = probe.logit(extreme).tolist()
    assert probe.score_logit(high) == 1.0 and probe.score_logit(low) == 0.0


def test_probes_readout_gives_each_probe_its_own_logit() -> None:
    gen = torch.Generator().manual_seed(1)
    probes = [Probe("x", k, "generated", torch.randn(k, generator=gen).tolist(), (torch.rand(k, generator=gen) + 0.5).tolist(),
                    torch.randn(k, generator=gen).tolist(), 0.3 * k, 0.5) for k in (2, 5)]
    selection = NeuronSelection(torch.tensor([0, 1, 0, 2, 1]), torch.tensor([4, 4, 9, 0, 7]))
    readout = probes_readout(selection, probes)
    acts = torch.randn(3, 5, generator=gen)
    logits = acts @ readout.weight + readout.bias
    for head, probe in enumerate(probes):
        torch.testing.assert_close(logits[:, head], probe.logit(acts[:, : probe.k]), atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match="reads 2 neurons, the selection has 1"):
        probes_readout(NeuronSelection(torch.tensor([0]), torch.tensor([1])), probes)


def test_probe_size_is_the_smallest_k_close_to_the_best_dev_auroc(monkeypatch: pytest.MonkeyPatch) -> None:
    from neuronguard.detector import guard_probes

    gen = torch.Generator().manual_seed(0)
    labels = [1] * 40 + [0] * 40
    signal = torch.tensor(labels, dtype=torch.float32)[:, None] * 1.5
    features = torch.randn(80, 12, generator=gen)
    features[:, :3] += signal  # only the first three neurons (in file order) carry the label
    monkeypatch.setattr(guard_probes, "last_token_features", lambda _m, prompts, selection: features[:, : len(selection)])
    neurons = NeuronSet.from_scores(torch.linspace(1, 0.1, 12).reshape(1, 12), {"model_type": "x"})
    dev = guard_probes.Labeled([f"p{i}" for i in range(80)], labels)
    k, table = guard_probes.choose_probe_k(None, neurons, dev, [1, 3, 12])  # type: ignore[arg-type]
    assert [row["k"] for row in table] == [1, 3, 12]
    best = max(row["dev_oof_auroc"] for row in table)
    assert k == 3 and table[1]["dev_oof_auroc"] >= best - 0.002 and table[0]["dev_oof_auroc"] < best - 0.002


def test_random_probe_controls_read_every_seed_in_shared_passes_with_the_same_result(tiny_llama_path: Path) -> None:
    """The seeds' random sets are captured together; each seed's AUROC equals a probe fitted on its own pass."""
    from neuronguard.detector import guard_probes
    from neuronguard.detector.features import last_token_features
    from neuronguard.models.artifact.neurons import NeuronSet
    from neuronguard.models.loading import load_model
    from sklearn.metrics import roc_auc_score

    model = load_model(tiny_llama_path)
    d_mlp = model.sites.d_mlp
    scores = torch.rand(model.sites.num_layers, d_mlp, generator=torch.Generator().manual_seed(1))
    neurons = NeuronSet.from_scores(scores, {"model_type": "llama"}).top(9)
    words = ["bomb", "cake", "poison", "garden", "hack", "poem", "steal", "song"]
    prompts = [f"how to {words[i % 8]} {i}" for i in range(32)]
    labels = [int(i % 2 == 0) for i in range(32)]  # the even words are the harmful ones
    dev, held = guard_probes.Labeled(prompts[:20], labels[:20]), guard_probes.Labeled(prompts[20:], labels[20:])
    seeds = [1, 2, 3, 4, 5]
    expected = []
    for s in seeds:  # one pass per seed, as a reader would write it
        selection = neurons.random_like(d_mlp, s).selection()
        probe = train_probe(last_token_features(model, dev.prompts, selection), torch.tensor(dev.labels),
                            neurons_sha256="random", position="last_prompt_token", seed=0)
        expected.append(float(roc_auc_score(held.labels, probe.score(last_token_features(model, held.prompts, selection)).numpy())))
    for max_columns in (10_000, 20):  # every seed in one pass; two seeds a pass
        got = guard_probes.random_probe_aurocs(model, neurons, dev, {"heldout": held}, seeds, seed=0, max_columns=max_columns)
        assert got["heldout"] == pytest.approx(expected, abs=1e-9)
    assert len(set(expected)) > 1  # the seeds are different sets
    # The probe-size sweep shares its passes the same way: each row equals its own probe fitted alone.
    rows = guard_probes.probe_sweep(model, neurons, dev, held, [3, 9], [1, 2], fpr=0.1)
    for row in rows:
        for chosen, got in [(neurons.top(row["k"]), row["top"]), (neurons.top(row["k"]).random_like(d_mlp, 2), row["random"][1])]:
            selection = chosen.selection()
            probe = train_probe(last_token_features(model, dev.prompts, selection), torch.tensor(dev.labels),
                                neurons_sha256="sweep", position="last_prompt_token", target_fpr=0.1)
            alone = evaluate_scores(probe.score(last_token_features(model, held.prompts, selection)).numpy(),
                                    np.array(held.labels), probe.threshold)
            assert got == pytest.approx({key: alone[key] for key in got}, abs=1e-9)
    # The bundle build reads both controls in one shared pass; it must change no number of either.
    for max_columns in (10_000, 20):
        together = guard_probes.random_controls_and_sweep(model, neurons, 3, dev, {"heldout": held, "dev2": dev}, seeds,
                                                          [3, 9], [1, 2], fpr=0.1, seed=0, sweep_split="heldout",
                                                          max_columns=max_columns)
        assert together == (guard_probes.random_probe_aurocs(model, neurons.top(3), dev, {"heldout": held, "dev2": dev}, seeds, seed=0),
                            guard_probes.probe_sweep(model, neurons, dev, held, [3, 9], [1, 2], fpr=0.1))
