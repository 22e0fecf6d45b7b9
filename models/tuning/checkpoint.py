"""Write checkpoints all-or-nothing: build in a temp dir next to the target, then rename.

A crash or a bad argument never leaves a half-written checkpoint behind, and an existing
output is replaced only with `--overwrite`, after the new one is complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from neuronguard.errors import UsageError


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless asked to replace it (checked before any work)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"output '{out}' already exists: choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output '{out}' exists and is not a directory")
    return out


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temp dir that becomes `out` when the block succeeds and vanishes when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stored_dtype(source: str) -> torch.dtype | None:
    """The dtype the source checkpoint was stored in (the loaded config says the runtime dtype)."""
    dtype = getattr(AutoConfig.from_pretrained(source), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def save_checkpoint(
    model: PreTrainedModel,
    source: str,
    out: Path,
    manifest_name: str,
    manifest: Callable[[], dict[str, Any]],
    dtype: torch.dtype | None,
) -> None:
    """Save weights (in the source's dtype), the source's own tokenizer files and a JSON manifest."""
    with staged_dir(out) as tmp:
        if dtype is not None:
            model.to(dtype)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        (tmp / manifest_name).write_text(json.dumps(manifest(), indent=2) + "\n")
