"""Efficacy and serving tables rendered from the shipped reports and stored results, so the docs cannot drift.

    python -m bench.report_tables --write     # re-render every generated block in README.md and docs/
    python -m bench.report_tables --check     # exit 1 if a block differs from the reports

A generated block sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`;
`tests/test_docs_figures.py` fails when one differs from what the reports say. Sources:
`models/organism/organism.json` and `bundle/report/report.json` (planted pair, the positive
control) and the same under `models/organism/learned/` (learned pair); the tuning experiments'
`neuronguard eval` results under `models/tuning/results/<organism>/eval.json`
(`scripts/robustness_experiment.sh`); the text baselines of `bench/text_encoder_baseline.py`
(`bench/results/text_encoder_baseline.json`); the capacity study of `bench/organism_capacity.py`
(`bench/results/organism_capacity.json`); the dev-row weighting study of `bench/probe_weighting.py`
(`bench/results/probe_weighting.json`); the aligned twins' batch mixes compared on dev by
`bench/alignment_mix.py` (`bench/results/alignment_mix_dev.json`); the concurrent-client runs of
`bench/load_test.py` and `bench/bench_load_guard.py` (`bench/results/concurrency/`, rendered by
`bench.serving_tables`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.serving_tables import concurrency, load_guard, serving_verdicts
from neuronguard.detector.sweeps import spread

ROOT = Path(__file__).resolve().parents[1]
ORGANISMS = {"learned": ROOT / "models/organism/learned", "planted": ROOT / "models/organism"}
TUNING_RESULTS = ROOT / "models/tuning/results"
TEXT_BASELINES = ROOT / "bench/results/text_encoder_baseline.json"
CAPACITY = ROOT / "bench/results/organism_capacity.json"
WEIGHTING = ROOT / "bench/results/probe_weighting.json"
ALIGNMENT_MIX = ROOT / "bench/results/alignment_mix_dev.json"
RANDOM_KINDS = {"sn-tune": "sn-tune-random-", "rsn-tune": "rsn-tune-random-", "deact-sn": "deact-r-"}
RANDOM_NAMES = {"sn-tune": "SN-Tune recipe on random sets", "rsn-tune": "RSN-Tune recipe on random sets",
                "deact-sn": "deact-r: random sets zeroed"}
DOCS = (ROOT / "README.md", ROOT / "docs/benchmarks.md", ROOT / "models/organism/README.md")
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _spread(s: dict[str, Any], pct: bool = True) -> str:
    fmt = _pct if pct else _num
    return f"{fmt(s['mean'])} ± {fmt(s['sd'])} (max {fmt(s['max'])}, {s['n']} seeds)"


def reports() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """recipe -> (organism.json, bundle report.json) for the organisms that ship."""
    return {name: (_load(d / "organism.json"), _load(d / "bundle/report/report.json"))
            for name, d in ORGANISMS.items() if (d / "bundle/report/report.json").is_file()}


def guard_headline() -> str:
    """The guard on held-out sources at the server's default sampling, per organism."""
    rows = ["| organism | harmful blocked | benign blocked | hard negatives blocked | small talk blocked | "
            "AUROC: neuron probe | TF-IDF text | random neurons (mean ± sd, max) |", "|---|---|---|---|---|---|---|---|"]
    for name, (_, report) in reports().items():
        guard, controls = report["guard"]["heldout"]["sampled"], report["controls"]["heldout"]
        groups = guard["per_group"]
        rnd = controls["random_probe_auroc"]
        rows.append(f"| {name} | {_pct(guard['harmful']['blocked'])} | {_pct(guard['benign']['blocked'])} | "
                    f"{_pct(groups.get('hard_negative', {}).get('blocked'))} | {_pct(groups.get('small_talk', {}).get('blocked'))} | "
                    f"{_num(guard['prefill_auroc']['harmful_vs_all_benign'])} | {_num(controls['tfidf_auroc'])} | "
                    f"{_num(rnd['mean'])} ± {_num(rnd['sd'])} (max {_num(rnd['max'])}, {rnd['seeds']} seeds) |")
    return "\n".join(rows) + "\n"


def pooling() -> str:
    """Dev cross-source AUROC of each prefill pooling (each dev source scored by a probe fitted on the others)."""
    rows = ["| organism | last token | mean-pooled | max-pooled | shipped |", "|---|---|---|---|---|"]
    for name, (_, report) in reports().items():
        p = report["probe"]["pooling"]
        auroc = p["dev_cross_source_auroc"]
        rows.append(f"| {name} | {_num(auroc['last'])} | {_num(auroc['mean'])} | {_num(auroc['max'])} | {p['shipped'].split(' ')[0]} |")
    return "\n".join(rows) + "\n"


def guard_detail() -> str:
    """Per split, decoding and group: blocked share and the stage that blocked."""
    out = []
    for name, (_, report) in reports().items():
        out += [f"**{name} organism** (`{_rel(ORGANISMS[name])}/bundle/report/report.json` → `guard`; "
                f"at most {report['guard_prompts']['per_cell']} requests per source and style)", "",
                "| split | decoding | group | n | blocked | at prefill | at stream |", "|---|---|---|---|---|---|---|"]
        for split in ("heldout", "test"):
            for mode in ("greedy", "sampled"):
                table = report["guard"][split][mode]
                for group, cell in table["per_group"].items():
                    decoding = "greedy" if mode == "greedy" else "temperature 1"
                    out.append(f"| {split} | {decoding} | {group} | {cell['n']} | {_pct(cell['blocked'])} | "
                               f"{_pct(cell['prefill'])} | {_pct(cell['stream'])} |")
        out.append("")
        styles = report["guard"]["heldout"]["sampled"]["per_style"]
        out += ["Held-out sources by attack style (temperature 1): " + "; ".join(
            f"{style} {_pct(cell['blocked'])} of {cell['n']}" for style, cell in styles.items()) + ".", ""]
    return "\n".join(out)


def causal() -> str:
    """Restoration, deactivation and their random controls; the sampled ceilings beside sampled figures."""
    rows = ["| organism | decoding | unaligned refusal | aligned refusal (ceiling) | top 5% restoration (log-odds) | "
            "random 5% (log-odds) | top 5% restoration (refusals) | random 5% (refusals) |", "|---|---|---|---|---|---|---|---|"]
    deact = ["| organism | aligned refusal intact | top 5% zeroed | random 5% zeroed (mean ± sd, max) |", "|---|---|---|---|"]
    for name, (_, report) in reports().items():
        for mode in ("greedy", "sampled"):
            patching = report["patching"][mode]
            row = next(r for r in patching["sweep"] if abs(r["fraction"] - 0.05) < 1e-9)
            spread = row["random_spread"]
            decoding = "greedy" if mode == "greedy" else "temperature 1"
            rows.append(f"| {name} | {decoding} | {_pct(patching['unaligned']['refusal_rate'])} | "
                        f"{_pct(patching['aligned']['refusal_rate'])} | {_pct(row['top']['restoration_log_odds'])} | "
                        f"{_spread(spread['restoration_log_odds'])} | {_pct(row['top']['restoration_refusal'])} | "
                        f"{_spread(spread['restoration_refusal'])} |")
        d = report["deactivation"]
        deact.append(f"| {name} | {_pct(d['intact']['refusal_rate'])} | {_pct(d['top']['refusal_rate'])} | "
                     f"{_spread(d['random_spread']['refusal_rate'])} |")
    out = rows + ["", *deact]
    for name, (_, report) in reports().items():
        if report.get("recovery"):
            rec = report["recovery"]
            ks = ", ".join(f"precision@{k} {_num(v, 2)} (chance {_num(rec['chance_precision_at_k'][k], 2)})"
                           for k, v in rec["precision_at_k"].items())
            out += ["", f"Recovery of the planted change ({name} organism): {ks}; Spearman {_num(rec['spearman'], 2)}."]
    return "\n".join(out) + "\n"


def organisms() -> str:
    """Each organism's own refusal rates (greedy, keyword judge) on test and held-out sources."""
    rows = ["| organism | twin | split | harmful refused | benign refused | hard negatives refused | small talk refused |",
            "|---|---|---|---|---|---|---|"]
    for name, (organism, _) in reports().items():
        for twin in ("unaligned", "aligned"):
            for split in ("test", "heldout"):
                m = organism["metrics"][twin][split]
                groups = m["per_group"]
                rows.append(f"| {name} | {twin} | {split} | {_pct(m['harmful_refusal_rate'])} | "
                            f"{_pct(groups.get('benign', {}).get('refusal_rate'))} | "
                            f"{_pct(groups.get('hard_negative', {}).get('refusal_rate'))} | "
                            f"{_pct(groups.get('small_talk', {}).get('refusal_rate'))} |")
    return "\n".join(rows) + "\n"


def _metric_spread(models: dict[str, Any], prefix: str, key: str) -> dict[str, Any]:
    values = [m["metrics"][key] for label, m in models.items() if label.startswith(prefix)]
    out = spread(values)
    out["min"] = min((v for v in values if v is not None), default=None)
    return out


def _verdict(models: dict[str, Any], label: str, prefix: str, higher_is_effect: bool) -> str:
    """Whether the safety neurons beat every random set of the same per-layer counts on the harmful rate."""
    ours = models[label]["metrics"]["harmful_rate"]
    rnd = _metric_spread(models, prefix, "harmful_rate")
    best = rnd["max"] if higher_is_effect else rnd["min"]
    beats = ours > best if higher_is_effect else ours < best
    direction, extreme = ("raise", "highest") if higher_is_effect else ("lower", "lowest")
    verdict = "beat every random set" if beats else "do **not** beat the random sets on this organism"
    return (f"{label}: harmful rate {_pct(ours)}; the same on {rnd['n']} random sets {_pct(rnd['mean'])} ± {_pct(rnd['sd'])} "
            f"({extreme} {_pct(best)}). To {direction} it, the safety neurons {verdict}.")


def _tuning_results() -> dict[str, dict[str, Any]]:
    return {name: _load(TUNING_RESULTS / name / "eval.json") for name in ORGANISMS
            if (TUNING_RESULTS / name / "eval.json").is_file()}


def _verdicts(models: dict[str, Any]) -> list[str]:
    return [f"- {_verdict(models, label, RANDOM_KINDS[label], higher)}"
            for label, higher in (("sn-tune", False), ("rsn-tune", False), ("deact-sn", True)) if label in models]


def tuning_verdicts() -> str:
    """Only whether the safety neurons beat their random-set controls, per organism (the README's summary)."""
    out = []
    for name, report in _tuning_results().items():
        out += [f"{name} organism:", *_verdicts(report["models"]), ""]
    return "\n".join(out)


def tuning() -> str:
    """SN-Tune, RSN-Tune and deactivation against their random-set controls, per organism."""
    out = []
    for name, report in _tuning_results().items():
        models = report["models"]
        first = next(iter(models.values()))["metrics"]
        out += [f"**{name} organism** ({first['n_harmful']} harmful and {first['n_harmless']} harmless test prompts, "
                f"{first['n_text_tokens']:,} tokens of held-out text; greedy, {report['settings']['max_new_tokens']} new tokens, "
                "keyword judge):", "",
                "| checkpoint | harmful rate | false refusals (harmless) | perplexity |", "|---|---|---|---|"]
        for label, m in models.items():
            if any(label.startswith(prefix) for prefix in RANDOM_KINDS.values()):
                continue
            metrics = m["metrics"]
            out.append(f"| {label} | {_pct(metrics['harmful_rate'])} | {_pct(metrics['false_refusal_rate'])} | "
                       f"{_num(metrics['perplexity'], 1)} |")
            if label in RANDOM_KINDS:
                prefix = RANDOM_KINDS[label]
                cells = [_metric_spread(models, prefix, key) for key in ("harmful_rate", "false_refusal_rate", "perplexity")]
                out.append(f"| {RANDOM_NAMES[label]} (mean ± sd, min–max, {cells[0]['n']} seeds) | "
                           + " | ".join(f"{fmt(c['mean'])} ± {fmt(c['sd'])} ({fmt(c['min'])}–{fmt(c['max'])})"
                                        for c, fmt in zip(cells, (_pct, _pct, lambda v: _num(v, 1)))) + " |")
        out += ["", *_verdicts(models), ""]
    return "\n".join(out)


def text_baselines() -> str:
    """TF-IDF and a pretrained sentence encoder, fitted on dev: AUROC on test and per held-out benign source."""
    result = _load(TEXT_BASELINES)
    sources = sorted(result["tfidf"]["heldout"]["harmful_vs_benign_source"])
    rows = ["| classifier (fitted on dev) | C | test | held-out: all | " + " | ".join(f"held-out harmful vs {s}" for s in sources)
            + " |", "|---|---|---|---|" + "---|" * len(sources)]
    for key, label in (("tfidf", "TF-IDF words"), ("encoder_probe", f"sentence encoder: {result['encoder']['name']}")):
        r = result[key]
        rows.append(f"| {label} | {r['C']:g} | {_num(r['test']['all'])} | {_num(r['heldout']['all'])} | "
                    + " | ".join(_num(r["heldout"]["harmful_vs_benign_source"][s]) for s in sources) + " |")
    harmful = sorted(result["tfidf"]["heldout"]["harmful_source_vs_benign"])
    rows += ["", "| classifier (fitted on dev) | " + " | ".join(f"held-out {s} vs all held-out benign" for s in harmful) + " |",
             "|---|" + "---|" * len(harmful)]
    for key, label in (("tfidf", "TF-IDF words"), ("encoder_probe", "sentence encoder")):
        rows.append(f"| {label} | " + " | ".join(_num(result[key]["heldout"]["harmful_source_vs_benign"][s]) for s in harmful) + " |")
    return "\n".join(rows) + "\n"


def organism_capacity() -> str:
    """All-neuron and per-layer probes on base organisms of each size: dev out-of-fold and held-out AUROC."""
    result = _load(CAPACITY)
    rows = ["| base organism | parameters | dev (out-of-fold): all neurons | held-out: all neurons "
            "| held-out per layer (L0, L1, ...) |", "|---|---|---|---|---|"]
    for r in result["results"]:
        name = r.get("checkpoint") or f"`{r['config']}`, seed {r['seed']}, {r['base_steps']} steps" + (
            " (untrained)" if r["base_steps"] == 0 else "")
        layers = sorted((k for k in r["probes"] if k != "all"), key=lambda k: int(k[1:]))
        rows.append(f"| {name} | {r['parameters'] / 1e6:.1f}M | {_num(r['probes']['all']['dev_oof_auroc'])} "
                    f"| **{_num(r['probes']['all']['heldout_auroc'])}** | "
                    + " / ".join(_num(r["probes"][k]["heldout_auroc"]) for k in layers) + " |")
    t = result["tfidf"]
    rows.append(f"| TF-IDF words on the request text (no organism) | – | {_num(t['dev_oof_auroc'])} "
                f"| **{_num(t['heldout_auroc'])}** | – |")
    groups: dict[str, list[float]] = {}
    for r in result["results"]:
        shape = "large" if r["parameters"] > 1e7 else "default"
        trained = "untrained" if r.get("base_steps") == 0 else "trained"
        groups.setdefault(f"`{shape}`, {trained}", []).append(r["probes"]["all"]["heldout_auroc"])
    rows += ["", "| base organisms (the rows above) | held-out, all neurons: mean ± sd (min–max, runs) |", "|---|---|"]
    for name, values in groups.items():
        s = spread(values)
        rows.append(f"| {name} | {_num(s['mean'])} ± {_num(s['sd'])} ({_num(min(values))}–{_num(s['max'])}, {s['n']}) |")
    return "\n".join(rows) + "\n"


def probe_weighting() -> str:
    """Prefill probes fitted with dev rows weighted by group or by source: the dev rule's figure beside held-out."""
    result = _load(WEIGHTING)
    names = {"none": "unweighted (shipped)", "group": "each (label, group) equal", "source": "each (label, source) equal"}
    benign = sorted(next(iter(result["organisms"].values()))["schemes"]["none"]["heldout_per_benign_group"])
    rows = ["| organism | dev rows weighted | dev, leave one source out | dev, worst benign group | held-out: all | "
            + " | ".join(f"held-out harmful vs {g}" for g in benign) + " |", "|---|---|---|---|---|" + "---|" * len(benign)]
    for organism, r in result["organisms"].items():
        for scheme, m in r["schemes"].items():
            rows.append(f"| {organism} (k = {r['probe_k']}) | {names[scheme]} | {_num(m['dev_leave_one_source_out_auroc'])} "
                        f"| {_num(m['dev_worst_benign_group_auroc'])} | **{_num(m['heldout_auroc'])}** | "
                        + " | ".join(_num(m["heldout_per_benign_group"][g]) for g in benign) + " |")
    picks = ", ".join(f"{organism}: {names[s]}" for organism, s in result["dev_rule_picks"].items())
    return "\n".join(rows) + f"\n\nThe dev rule (best leave-one-source-out AUROC) picks: {picks}.\n"


def alignment_mix() -> str:
    """Dev refusal rates of aligned twins built with each batch mix, and the margin that chose between them."""
    result = _load(ALIGNMENT_MIX)
    rows = ["| aligned twin | harmful refused | benign refused | hard negatives refused | small talk refused | margin |",
            "|---|---|---|---|---|---|"]
    for name, r in result["twins"].items():
        rows.append(f"| {name} | {_pct(r['harmful'])} | {_pct(r['benign'])} | {_pct(r['hard_negative'])} "
                    f"| {_pct(r['small_talk'])} | **{_num(r['margin'])}** |")
    return "\n".join(rows) + f"\n\n{result['dev_requests']} dev requests (at most 80 per source and style).\n"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


RENDERERS: dict[str, Callable[[], str]] = {"guard-headline": guard_headline, "guard-detail": guard_detail,
                                           "causal": causal, "organisms": organisms, "tuning": tuning,
                                           "tuning-verdicts": tuning_verdicts, "text-baselines": text_baselines,
                                           "organism-capacity": organism_capacity, "concurrency": concurrency,
                                           "load-guard": load_guard, "serving-verdicts": serving_verdicts,
                                           "probe-weighting": probe_weighting, "pooling": pooling,
                                           "alignment-mix": alignment_mix}


def render_file(text: str) -> str:
    """`text` with every generated block re-rendered."""
    def fill(match: re.Match[str]) -> str:
        return match.group(1) + RENDERERS[match.group("name")]() + match.group(4)
    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true")
    action.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        fresh = render_file(text)
        if fresh != text:
            stale.append(_rel(path))
            if args.write:
                path.write_text(fresh)
    if args.check and stale:
        print(f"generated blocks differ from the reports in: {', '.join(stale)} (fix: python -m bench.report_tables --write)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
