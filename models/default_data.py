"""The default inputs of the offline commands: the labelled splits and held-out text that ship
with the built-in organism (`neuronguard organism data` derives them).

Commands take these as their defaults from here, so no package but the organism's own code
reaches into the organism's folder layout, and every command points at the same files.
"""

from __future__ import annotations

from neuronguard.models.organism import DATA_DIR, SPLITS_DIR

TRAIN_SPLIT = SPLITS_DIR / "train.jsonl"  # builds the organism; the only split tuning data may come from
DEV_SPLIT = SPLITS_DIR / "dev.jsonl"  # fits the detector: neurons, probes, thresholds
TEST_SPLIT = SPLITS_DIR / "test.jsonl"  # held out rows of the dev sources
HELDOUT_SPLIT = SPLITS_DIR / "heldout.jsonl"  # whole sources and jailbreak templates never fitted on: efficacy is led by these
GENERAL_TEXT_TEST = DATA_DIR / "general_text_test.jsonl"  # held-out general text, for perplexity
