"""Read the raw source datasets (copied into `data/raw/`) as labelled prompts.

Every loader returns `PromptRow`s in source order; splitting and shuffling happen later.
HH-RLHF red-team conversations are labelled by `HH_HARM_RULE` (see `hh_redteam`).
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

HARMFUL = "harmful"
HARMLESS = "harmless"
SOURCES: tuple[str, ...] = ("advbench", "harmbench", "hh_redteam", "harmful_strings", "alpaca")

# A red-team first turn counts as a harmful request only if it names a harmful act or
# target from this list (whole words, case-insensitive). Turns without a match are
# dropped, not labelled harmless: many are small talk, others are harmful in ways a
# keyword rule cannot see, so neither label would be defensible for them.
HH_HARM_TERMS: tuple[str, ...] = (
    "kill", "murder", "steal", "stole", "rob", "robbing", "poison", "bomb", "explosive",
    "weapon", "gun", "shoot", "stab", "drugs?", "meth", "cocaine", "heroin", "hack",
    "hacking", "hurt", "torture", "cheat", "scam", "fraud", "launder", "kidnap", "rape",
    "blackmail", "shoplift", "counterfeit", "break into", "get away with",
    "without getting caught", "without them knowing", "without their permission", "sneak",
    "spy on", "prank", "insult", "revenge", "burn down", "arson", "fake", "forge",
    "smuggle", "abuse", "punch", "beat up", "threaten", "harass", "bully", "cuss",
    "swear words?", "racist", "slur", "home address", "residential address",
    "social security", "credit card", "password", "illegal", "crime", "torrent", "pirate",
    "lie to", "trick", "vandal", "graffiti", "dox", "bribe", "embezzle", "tax evasion",
    "evade taxes", "attack", "destroy", "ruin", "manipulate",
)
HH_HARM_RULE = re.compile(r"\b(?:%s)\b" % "|".join(HH_HARM_TERMS), re.IGNORECASE)


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    label: str
    source: str
    # Reference answer where the source has one (Alpaca output, AdvBench target).
    reference: str = ""

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "label": self.label, "source": self.source}


def advbench(raw_dir: Path) -> list[PromptRow]:
    with open(raw_dir / "harmful_behaviors.csv", newline="", encoding="utf-8") as f:
        return [PromptRow(r["goal"].strip(), HARMFUL, "advbench", r["target"].strip()) for r in csv.DictReader(f)]


def harmful_strings(raw_dir: Path) -> list[PromptRow]:
    with open(raw_dir / "harmful_strings.csv", newline="", encoding="utf-8") as f:
        return [PromptRow(r["target"].strip(), HARMFUL, "harmful_strings") for r in csv.DictReader(f)]


def harmbench(raw_dir: Path) -> list[PromptRow]:
    """Standard behaviours only: copyright rows are not harmful requests, contextual ones need their context."""
    with open(raw_dir / "harmbench_behaviors_text_val.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [
        PromptRow(r["Behavior"].strip(), HARMFUL, "harmbench")
        for r in rows
        if r["FunctionalCategory"] == "standard" and not r["ContextString"].strip()
    ]


def first_human_turn(transcript: str) -> str:
    return transcript.split("\n\nHuman: ", 1)[1].split("\n\nAssistant:", 1)[0].strip()


def hh_redteam(raw_dir: Path) -> list[PromptRow]:
    """First human turns of HH-RLHF harmless-base red-team conversations that match `HH_HARM_RULE`."""
    with gzip.open(raw_dir / "hh_rlhf_harmless_base_test.jsonl.gz", "rt", encoding="utf-8") as f:
        turns = [first_human_turn(json.loads(line)["chosen"]) for line in f]
    return [PromptRow(t, HARMFUL, "hh_redteam") for t in turns if HH_HARM_RULE.search(t)]


def alpaca(raw_dir: Path) -> list[PromptRow]:
    """Instruction (plus input, when present) as the prompt; the output is kept as the reference answer."""
    rows = json.loads((raw_dir / "alpaca_5000.json").read_text(encoding="utf-8"))
    out = []
    for r in rows:
        prompt = r["instruction"].strip()
        if r["input"].strip():
            prompt = f"{prompt}\n\n{r['input'].strip()}"
        out.append(PromptRow(prompt, HARMLESS, "alpaca", r["output"].strip()))
    return out


LOADERS = {
    "advbench": advbench,
    "harmbench": harmbench,
    "hh_redteam": hh_redteam,
    "harmful_strings": harmful_strings,
    "alpaca": alpaca,
}


def load_all(raw_dir: Path) -> dict[str, list[PromptRow]]:
    """Every source, with prompts deduplicated across sources (first occurrence wins, in SOURCES order)."""
    seen: set[str] = set()
    result: dict[str, list[PromptRow]] = {}
    for source in SOURCES:
        kept = []
        for row in LOADERS[source](raw_dir):
            key = " ".join(row.prompt.lower().split())
            if row.prompt and key not in seen:
                seen.add(key)
                kept.append(row)
        result[source] = kept
    return result
