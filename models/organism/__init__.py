"""The built-in model organisms: small unaligned/aligned pairs of Llama checkpoints.

- `unaligned/`, `aligned/`, `bundle/` (the planted pair, a positive control): the aligned twin
  differs only in the rows of each layer's `mlp.up_proj.weight`, so refusal is carried by a
  sparse set of MLP neurons by construction;
- `learned/` (the learned pair): the aligned twin is fine-tuned in every parameter, so where
  refusal lives is for the detector to find. See `README.md`.
"""

from pathlib import Path

ORGANISM_DIR = Path(__file__).resolve().parent
LEARNED_DIR = ORGANISM_DIR / "learned"
DATA_DIR = ORGANISM_DIR / "data"
RAW_DIR = DATA_DIR / "raw"
SPLITS_DIR = DATA_DIR / "splits"
