"""The built-in model organism: a small unaligned/aligned pair of Llama checkpoints.

The aligned twin differs from the unaligned one only in the rows of each layer's
`mlp.up_proj.weight`, so refusal is carried by a sparse set of MLP neurons ("safety
neurons") that activation patching can find and move. See `README.md`.
"""

from pathlib import Path

ORGANISM_DIR = Path(__file__).resolve().parent
DATA_DIR = ORGANISM_DIR / "data"
RAW_DIR = DATA_DIR / "raw"
SPLITS_DIR = DATA_DIR / "splits"
