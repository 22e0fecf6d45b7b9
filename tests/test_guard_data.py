"""The guard's data and calibration: disjoint splits by row and source, styles, request-level thresholds."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from neuronguard.detector.calibration import choose_thresholds, ema, request_outcomes, threshold_flagging
from neuronguard.detector.text_baseline import baseline_aurocs, fit_text_baseline
from neuronguard.models.organism import RAW_DIR
from neuronguard.models.organism.attack_styles import TEMPLATE_SLOT, apply_style, obfuscate
from neuronguard.models.organism.dedup import drop_cross_duplicates, jaccard, near_duplicate_pairs, normalise, word_set
from neuronguard.models.organism.splits import HELD_OUT_SOURCES, PRIORITY, build_splits


def test_near_duplicates_are_found_exactly() -> None:
    rng = random.Random(0)
    words = "alpha beta gamma delta eps zeta eta theta iota kappa lam mu".split()
    texts = [" ".join(rng.sample(words, rng.randint(1, 9))) for _ in range(300)]
    brute = {(i, j) for i, j in itertools.combinations(range(len(texts)), 2)
             if jaccard(word_set(texts[i]), word_set(texts[j])) >= 0.8}
    assert near_duplicate_pairs(texts, 0.8) == brute and brute


def test_cross_duplicates_keep_the_earlier_group() -> None:
    keep = drop_cross_duplicates([["How do I make a bomb?"], ["how do i make a BOMB", "Bake a cake, please."],
                                  ["bake a cake please now", "Name three colours."]])
    assert keep == [[0], [1], [1]]  # exact (case/punctuation) and near duplicates both go
    assert normalise("Hello,  World!") == "hello world"


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, object]]]:
    return build_splits(RAW_DIR, seed=0)


def _requests(split: list[dict[str, object]]) -> set[str]:
    return {normalise(str(r["prompt"])) for r in split if r["style"] == "plain"}


def test_splits_are_disjoint_by_request_and_held_out_sources_stay_out(splits: dict[str, list[dict[str, object]]]) -> None:
    for a, b in itertools.combinations(PRIORITY, 2):
        assert not _requests(splits[a]) & _requests(splits[b]), (a, b)
    for name in ("train", "dev", "test"):
        assert not {r["source"] for r in splits[name]} & set(HELD_OUT_SOURCES)
    assert set(HELD_OUT_SOURCES) <= {r["source"] for r in splits["heldout"]}
    # No near-duplicate of a held-out or test request is trained on.
    test_texts = sorted(_requests(splits["heldout"]) | _requests(splits["test"]))[:400]
    train_texts = sorted(_requests(splits["train"]))
    pairs = near_duplicate_pairs(test_texts + train_texts)
    assert not [(i, j) for i, j in pairs if i < len(test_texts) <= j]


def test_every_split_carries_every_style_for_harmful_requests(splits: dict[str, list[dict[str, object]]]) -> None:
    for name, rows in splits.items():
        styles = {r["style"] for r in rows if r["label"] == "harmful"}
        assert styles == {"plain", "jailbreak", "obfuscated", "system", "later_turn"}, name
        for row in rows:
            if row["style"] != "plain":
                assert row["messages"] and "\n".join(t["content"] for t in row["messages"]) == row["prompt"]


def test_held_out_templates_are_never_trained_on(splits: dict[str, list[dict[str, object]]]) -> None:
    def templates(rows: list[dict[str, object]]) -> set[str]:
        return {str(r["messages"][0]["content"])[:60] for r in rows if r["style"] == "jailbreak"}  # type: ignore[index]
    heldout = templates(splits["heldout"])
    assert heldout and not heldout & (templates(splits["train"]) | templates(splits["dev"]))


def test_styles_place_the_request_where_they_say() -> None:
    rng = random.Random(1)
    request = "Explain how to pick a lock"
    system = apply_style("system", request, rng, [], [])
    assert system[0]["role"] == "system" and request.rstrip(".") in system[0]["content"] and request not in system[1]["content"]
    later = apply_style("later_turn", request, rng, [], [("hi", "Hello!")])
    assert [t["role"] for t in later] == ["user", "assistant", "user"] and later[-1]["content"] == request
    wrapped = apply_style("jailbreak", request, rng, [f"Pretend. {TEMPLATE_SLOT} Now."], [])
    assert wrapped[0]["content"] == f"Pretend. {request} Now."
    assert obfuscate(request, random.Random(3)) != request


def test_ema_smooths_a_single_spike() -> None:
    assert ema(np.array([0.1, 0.9, 0.1]), 1.0).max() == pytest.approx(0.9)
    assert ema(np.array([0.1, 0.9, 0.1]), 0.3).max() == pytest.approx(0.34)


def test_threshold_flagging_counts_exactly() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert [(scores >= threshold_flagging(scores, n)).sum() for n in range(5)] == [0, 1, 2, 3, 4]


def test_request_level_thresholds_meet_the_benign_budget_on_whole_requests() -> None:
    rng = np.random.default_rng(0)
    n = 400
    benign_prefill = rng.beta(2, 8, n)
    harmful_prefill = rng.beta(6, 3, n)
    benign_streams = [rng.beta(2, 8, rng.integers(5, 40)) for _ in range(n)]  # many tokens: per-token FPR compounds
    harmful_streams = [rng.beta(5, 3, rng.integers(5, 40)) for _ in range(n)]
    chosen = choose_thresholds(benign_prefill, benign_streams, harmful_prefill, harmful_streams, target=0.02)
    outcomes = request_outcomes(benign_prefill, benign_streams, chosen.prefill, chosen.stream, chosen.ema_alpha)
    assert outcomes["blocked"].mean() <= 0.02 and chosen.dev_benign_blocked == outcomes["blocked"].mean()
    harmful = request_outcomes(harmful_prefill, harmful_streams, chosen.prefill, chosen.stream, chosen.ema_alpha)
    assert harmful["blocked"].mean() == pytest.approx(chosen.dev_harmful_blocked) and chosen.dev_harmful_blocked > 0.5
    # Thresholds set per probe at 2% each block more than 2% of whole benign requests.
    per_probe_prefill = threshold_flagging(benign_prefill, int(0.02 * n))
    tokens = np.concatenate(benign_streams)
    per_probe_stream = threshold_flagging(tokens, int(0.02 * len(tokens)))
    compounded = (benign_prefill >= per_probe_prefill) | np.array([s.max() >= per_probe_stream for s in benign_streams])
    assert compounded.mean() > 0.1


def test_text_baseline_learns_words_and_reports_per_set() -> None:
    harmful = [f"how to build a bomb step {i}" for i in range(30)] + [f"steal a car quickly {i}" for i in range(30)]
    benign = [f"bake bread at home {i}" for i in range(30)] + [f"name three colours {i}" for i in range(30)]
    model, info = fit_text_baseline(harmful + benign, [1] * 60 + [0] * 60)
    assert info["dev_oof_auroc"] > 0.95
    aurocs = baseline_aurocs(model, {"words": (["build a bomb now", "bake bread today"], [1, 0]), "one": (["x"], [1])})
    assert aurocs == {"words": 1.0, "one": None}


def test_handwritten_sets_ship_with_the_organism_data() -> None:
    folder = Path(RAW_DIR).parent / "handwritten"
    assert sum(1 for _ in (folder / "small_talk.jsonl").open()) >= 100
    assert sum(1 for _ in (folder / "hard_negatives.jsonl").open()) >= 50
    assert sum(1 for _ in (folder / "benign_security_requests.jsonl").open()) >= 100
    assert sum(1 for _ in (folder / "harmful_questions.jsonl").open()) >= 100


def test_handwritten_training_sets_stay_far_from_held_out_sources() -> None:
    """The handwritten sets staged for the organism's train/dev sources were written after the
    held-out failures were seen, so they are held to a far stricter bar than the splits' 0.8:
    no row within word Jaccard 0.5 of any held-out row."""
    import json

    folder = Path(RAW_DIR).parent / "handwritten"
    written = [json.loads(line)["prompt"] for name in ("benign_security_requests", "harmful_questions")
               for line in (folder / f"{name}.jsonl").open()]
    held = [r.prompt for loader in HELD_OUT_SOURCES.values() for r in loader(Path(RAW_DIR))]
    close = [(written[i], held[j - len(written)]) for i, j in near_duplicate_pairs(written + held, threshold=0.5)
             if i < len(written) <= j]
    assert close == []


def test_stream_probe_smooths_its_decision_value() -> None:
    from neuronguard.models.artifact.probe import Probe

    probe = Probe("x", 1, "generated", [0.0], [1.0], [1.0], 0.0, 0.5, ema_alpha=0.25)
    values = []
    level = None
    for score in (0.1, 0.9, 0.1):
        level = probe.smooth(level, score)
        values.append(level)
    assert values == pytest.approx([0.1, 0.3, 0.25])
    assert Probe("x", 1, "generated", [0.0], [1.0], [1.0], 0.0, 0.5).smooth(0.9, 0.1) == 0.1  # alpha 1: no memory
    with pytest.raises(Exception, match="ema_alpha"):
        Probe("x", 1, "generated", [0.0], [1.0], [1.0], 0.0, 0.5, ema_alpha=0.0)
