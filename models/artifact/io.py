"""Artifact I/O: content digests and atomic writes, so readers never see half a file.

`weights_digest` identifies a checkpoint by its weights, so a bundle can refuse a fine-tune of
the same architecture that its probes were never fitted to. A hub id is read from its snapshot
in the Hugging Face cache, the files the model was loaded from. Hashing gigabytes on every start
would be slow, so each file's digest is cached under `$XDG_CACHE_HOME/neuronguard/` (default
`~/.cache/neuronguard/`), keyed by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


WEIGHTS_CACHE = "weights_sha256.json"


def cache_dir() -> Path:
    """NeuronGuard's cache folder (XDG_CACHE_HOME honoured)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neuronguard"


def checkpoint_dir(model: str | Path) -> Path | None:
    """The local folder of a checkpoint: the directory itself, or a hub id's cached snapshot."""
    directory = Path(model).expanduser()
    if directory.is_dir():
        return directory
    try:
        config = try_to_load_from_cache(str(model), "config.json")
    except ValueError:  # not a valid hub id either
        return None
    return Path(config).parent if isinstance(config, str) else None


def weights_digest(model_dir: str | Path) -> str | None:
    """sha256 over the per-file sha256 of a checkpoint's `*.safetensors`, in file-name order.

    The digest is `sha256("\n".join(sha256(f) for f in sorted(files)))` of the hex file digests;
    a hub id is hashed from its cached snapshot (the revision its `main` ref names). None for a
    hub id not in the cache or a folder without safetensors (nothing to identify it by).
    Per-file digests are reused from the cache while a file's size and mtime are unchanged; a
    cache that cannot be read or written is ignored.
    """
    directory = checkpoint_dir(model_dir)
    files = sorted(directory.glob("*.safetensors")) if directory is not None else []
    if not files:
        return None
    cache_path = cache_dir() / WEIGHTS_CACHE
    cache = _read_cache(cache_path)
    digests, changed = [], False
    for path in files:
        stat, key = path.stat(), str(path.resolve())
        entry = cache.get(key)
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
                and isinstance(entry.get("sha256"), str)):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
            cache[key], changed = entry, True
        digests.append(entry["sha256"])
    if changed:
        try:
            write_json(cache_path, {k: v for k, v in cache.items() if Path(k).is_file()})  # forget deleted checkpoints
        except OSError:
            pass  # a read-only home only costs the hashing next time
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))
