"""Static security rules over the product's own source: no pickle, eval or unsafe loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [p for d in ("models", "detector", "server", "neuronguard", "bench") for p in (ROOT / d).rglob("*.py")]

FORBIDDEN = {
    "pickle": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b|pickle\.loads?\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "trust_remote_code=True default": re.compile(r"trust_remote_code\s*[:=]\s*(bool\s*=\s*)?True"),
    "yaml.load": re.compile(r"yaml\.load\("),
}


def test_product_source_is_scanned() -> None:
    assert len(PRODUCT) > 10


@pytest.mark.parametrize("rule", sorted(FORBIDDEN))
def test_no_forbidden_construct(rule: str) -> None:
    pattern = FORBIDDEN[rule]
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in PRODUCT
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not hits, f"{rule} found:\n" + "\n".join(hits)


def test_rules_catch_what_they_claim(tmp_path: Path) -> None:
    samples = {
        "pickle": "import pickle",
        "eval/exec": "x = eval(text)",
        "torch.load without weights_only=True": "state = torch.load(path)",
        "trust_remote_code=True default": "trust_remote_code: bool = True",
        "yaml.load": "cfg = yaml.load(handle)",
    }
    for rule, line in samples.items():
        assert FORBIDDEN[rule].search(line), rule
    assert not FORBIDDEN["torch.load without weights_only=True"].search("torch.load(p, weights_only=True)")
    assert not FORBIDDEN["eval/exec"].search("model.eval()")
