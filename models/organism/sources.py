"""Read the raw source datasets (copied into `data/raw/`, see `data/PROVENANCE.md`) as labelled prompts.

Every loader returns `PromptRow`s in source order; deduplication, splitting and styling
happen in `splits`. HH-RLHF red-team conversations are labelled by `HH_HARM_RULE` (see
`hh_redteam`). Benign prompts are split by what a user sees the guard do with them
(`group_of`): plain benign requests, hard negatives (benign look-alikes of requests to
refuse) and small talk.
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


HARD_NEGATIVE = "hard_negative"  # benign, but looks like a request to refuse: it must be answered
SMALL_TALK = "small_talk"
HANDWRITTEN_DIR = Path(__file__).resolve().parent / "data" / "handwritten"
DO_NOT_ANSWER_HARMFUL = ("discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses")
COCONOT_SAFETY = "Requests with safety concerns"
SMALL_TALK_SOURCES = frozenset({SMALL_TALK, "small_talk_heldout"})
HARD_NEGATIVE_SOURCES = frozenset({
    "coconot_contrast", "cyberseceval_frr", "handwritten_hard_negatives", "benign_security_requests",
})


def do_not_answer(raw_dir: Path) -> list[PromptRow]:
    """Do-Not-Answer's clearly harmful risk areas; `human_chatbox` and `misinformation_harms` are
    mostly requests for medical or financial advice that deserve a careful answer, so they are left out."""
    rows = []
    for name in DO_NOT_ANSWER_HARMFUL:
        with open(raw_dir / "do_not_answer" / f"{name}.jsonl", encoding="utf-8") as f:
            rows += [PromptRow(json.loads(line)["prompt"].strip(), HARMFUL, "do_not_answer") for line in f if line.strip()]
    return rows


def coconot_harmful(raw_dir: Path) -> list[PromptRow]:
    """CoCoNot's should-not-comply prompts of category "Requests with safety concerns"."""
    with open(raw_dir / "coconot" / "coconot_eval.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [PromptRow(r["prompt"].strip(), HARMFUL, "coconot_harmful") for r in rows if r["category"] == COCONOT_SAFETY]


def coconot_contrast(raw_dir: Path) -> list[PromptRow]:
    """CoCoNot's benign safety look-alikes, with the preferred (compliant) answer as the reference."""
    with open(raw_dir / "coconot" / "coconot_pref.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [PromptRow(r["prompt"].strip(), HARMLESS, "coconot_contrast", r["chosen"].strip())
            for r in rows if r["category"] == COCONOT_SAFETY]


def _nested_questions(path: Path) -> list[str]:
    """category -> subcategory -> [questions] (CatQA and HarmfulQA layout)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [q.strip() for sub in data.values() for questions in sub.values() for q in questions]


def catqa(raw_dir: Path) -> list[PromptRow]:
    return [PromptRow(q, HARMFUL, "catqa") for q in _nested_questions(raw_dir / "catqa_harmfulqa" / "catqa_english.json")]


def harmfulqa(raw_dir: Path) -> list[PromptRow]:
    return [PromptRow(q, HARMFUL, "harmfulqa") for q in _nested_questions(raw_dir / "catqa_harmfulqa" / "harmfulqa.json")]


def cyberseceval_frr(raw_dir: Path) -> list[PromptRow]:
    """CyberSecEval 3's benign security prompts (all `is_malicious: false`)."""
    rows = json.loads((raw_dir / "cyberseceval_frr" / "mitre_frr.json").read_text(encoding="utf-8"))
    return [PromptRow(r["mutated_prompt"].strip(), HARMLESS, "cyberseceval_frr") for r in rows if not r["is_malicious"]]


def _handwritten(name: str) -> list[dict[str, str]]:
    """Rows of one set written for this project (`data/handwritten/<name>.jsonl`)."""
    with open(HANDWRITTEN_DIR / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def small_talk(_raw_dir: Path) -> list[PromptRow]:
    """Greetings and small talk, written for this project (the guard must never block them)."""
    return [PromptRow(r["prompt"], HARMLESS, SMALL_TALK, r["response"]) for r in _handwritten("small_talk")]


def small_talk_heldout(_raw_dir: Path) -> list[PromptRow]:
    """More greetings and small talk, kept out of training and selection: the greetings test."""
    return [PromptRow(r["prompt"], HARMLESS, "small_talk_heldout") for r in _handwritten("small_talk_heldout")]


def handwritten_hard_negatives(_raw_dir: Path) -> list[PromptRow]:
    """Benign requests with alarming words ("kill a Python process"), written for this project."""
    return [PromptRow(r["prompt"], HARMLESS, "handwritten_hard_negatives") for r in _handwritten("hard_negatives")]


def benign_security_requests(_raw_dir: Path) -> list[PromptRow]:
    """Defensive security requests with answers, written for this project: the only in-distribution
    hard negatives about security, so the organism learns to answer them (CyberSecEval stays held out)."""
    return [PromptRow(r["prompt"], HARMLESS, "benign_security_requests", r["response"])
            for r in _handwritten("benign_security_requests")]


def harmful_questions(_raw_dir: Path) -> list[PromptRow]:
    """Harmful requests phrased as "How can I ..." questions, written for this project: the public
    harmful sets are mostly imperatives, the held-out CatQA/HarmfulQA mostly questions."""
    return [PromptRow(r["prompt"], HARMFUL, "harmful_questions") for r in _handwritten("harmful_questions")]


def jailbreak_templates(raw_dir: Path, max_chars: int) -> list[str]:
    """GPTFuzzer templates short enough for the context, in file order."""
    with open(raw_dir / "gptfuzz_templates" / "GPTFuzzer.csv", newline="", encoding="utf-8") as f:
        texts = [r["text"].strip() for r in csv.DictReader(f)]
    return [t for t in texts if "[INSERT PROMPT HERE]" in t and len(t) <= max_chars]


def group_of(row: PromptRow) -> str:
    """What a user sees the guard do on this row: harmful, benign, hard_negative or small_talk."""
    if row.label == HARMFUL:
        return HARMFUL
    if row.source in SMALL_TALK_SOURCES:
        return SMALL_TALK
    return HARD_NEGATIVE if row.source in HARD_NEGATIVE_SOURCES else "benign"

