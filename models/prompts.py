"""Prompt files: `.txt` (one per line), `.jsonl` (field `prompt`, optional `label`) or `.csv`.

A `.jsonl` row may also carry `messages` (chat turns: a system message, earlier turns); the
request is then that conversation, and `prompt` is only its text for reading.

Every command (detector, tuning evaluation, benchmarks) reads prompts the same way, so
`--label harmful` on a split file or `--column goal` on AdvBench's CSV works everywhere.
Bad files are user errors (one line, exit 2).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neuronguard.models.jsonl import read_records
from neuronguard.models.artifact.io import file_sha256
from neuronguard.errors import UsageError

if TYPE_CHECKING:
    from neuronguard.models.chat import Request

CSV_COLUMNS: tuple[str, ...] = ("prompt", "goal", "Behavior")


@dataclass(frozen=True)
class PromptSource:
    """Where a list of prompts came from: recorded in reports and bundle manifests."""

    path: str
    sha256: str
    label: str | None
    count: int

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "label": self.label, "count": self.count}


def row_request(row: dict) -> Request:
    """A row's request: its `messages` conversation where it has one, else its `prompt` text."""
    messages = row.get("messages")
    if messages is None:
        return str(row["prompt"]).strip()
    if not isinstance(messages, list) or not all(isinstance(t, dict) and {"role", "content"} <= t.keys() for t in messages):
        raise UsageError("a 'messages' field must be a list of {\"role\", \"content\"} turns")
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in messages]


def _jsonl(path: Path, label: str | None) -> list[Request]:
    """Requests of `{"prompt", "label"?, "messages"?}` rows; with `label`, rows carrying another label are skipped.

    A row without a `label` field is kept: a file of harmful prompts only needs no labels.
    """
    rows = read_records(path, ["prompt"], allow_empty=True)
    return [row_request(row) for row in rows if label is None or row.get("label", label) == label]


def _csv(path: Path, column: str | None) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        chosen = column or next((c for c in CSV_COLUMNS if c in fields), None)
        if chosen is None or chosen not in fields:
            wanted = column or " or ".join(CSV_COLUMNS)
            raise UsageError(f"'{path}' has no column {wanted} (columns: {', '.join(fields) or 'none'}): pass --column")
        return [row[chosen] for row in reader if row.get(chosen)]


def read_prompts(
    path: str | Path, *, label: str | None = None, column: str | None = None, limit: int | None = None
) -> tuple[list[Request], PromptSource]:
    """Non-empty prompts of a file (optionally only rows with `label`), at most `limit`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompt file '{path}' not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            prompts = _jsonl(path, label)
        elif suffix == ".csv":
            prompts = _csv(path, column)
        elif suffix == ".txt":
            prompts = path.read_text(encoding="utf-8").splitlines()
        else:
            raise UsageError(f"prompt file '{path}' must end in .txt, .jsonl or .csv")
    except UnicodeDecodeError as exc:
        raise UsageError(f"prompt file '{path}' is not UTF-8 text") from exc
    if label is not None and suffix != ".jsonl":
        raise UsageError(f"--label filters .jsonl files only, '{path}' is {suffix}")
    prompts = [p.strip() if isinstance(p, str) else p for p in prompts if p and (not isinstance(p, str) or p.strip())]
    if not prompts:
        detail = f" with label '{label}'" if label else ""
        raise UsageError(f"prompt file '{path}' has no prompts{detail}")
    if limit is not None:
        prompts = prompts[:limit]
    return prompts, PromptSource(str(path), file_sha256(path), label, len(prompts))


def read_labeled(path: str | Path, limit_per_label: int | None = None) -> tuple[list[Request], list[int], PromptSource]:
    """A split file's prompts with labels (1 = harmful, 0 = harmless); every row must carry its label."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise UsageError(f"labelled prompts come in a .jsonl file with 'prompt' and 'label' fields, '{path}' is not one")
    rows = read_records(path, ["prompt", "label"], allow_empty=True)
    harmful, harmless = ([row_request(r) for r in rows if r["label"] == kind][:limit_per_label] for kind in ("harmful", "harmless"))
    for kind, found in (("harmful", harmful), ("harmless", harmless)):
        if not found:
            raise UsageError(f"prompt file '{path}' has no prompts with label '{kind}'")
    prompts = harmful + harmless
    return prompts, [1] * len(harmful) + [0] * len(harmless), PromptSource(str(path), file_sha256(path), "harmful+harmless", len(prompts))
