"""JSONL records with required string fields: the one reader and writer of the project's data files.

Errors name the file and line, so a bad row in a user's data is found without a debugger.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from neuronguard.models.artifact.io import atomic_write
from neuronguard.errors import UsageError


def read_records(path: str | Path, keys: Sequence[str], *, allow_empty: bool = False) -> list[dict[str, str]]:
    """Rows of a JSONL file, each an object with non-empty string `keys`; errors name the line.

    `allow_empty` lets a caller with its own, more specific message handle a file without rows.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file '{path}' not found")
    rows: list[dict[str, str]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg}); write one JSON object per line") from exc
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{number}: expected a JSON object with keys {', '.join(keys)}")
            for key in keys:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise UsageError(f"{path}:{number}: field '{key}' is missing or not a non-empty string")
            rows.append(row)
    if not rows and not allow_empty:
        raise UsageError(f"data file '{path}' has no records: expected JSONL rows with keys {', '.join(keys)}")
    return rows


def write_records(path: str | Path, records: Iterable[Mapping[str, object]]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
