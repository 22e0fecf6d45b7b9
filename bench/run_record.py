"""What a benchmark result needs to be reread later: the command, when, on what machine, at which commit.

Timings move with the machine (two 2-core VMs differ by 2x in one-client speed), so every
stored result says which machine produced it; the docs' tables are rendered from these files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from importlib.metadata import version
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _command() -> str:
    """This process's command line as one would retype it: `python -m bench.x ...` for the repo's modules."""
    script = Path(sys.argv[0]).resolve()
    target = ("-m " + script.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
              if script.is_relative_to(ROOT) else str(script))
    threads = os.environ.get("OMP_NUM_THREADS")
    return " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), "python", target, *sys.argv[1:]])


def run_record() -> dict[str, Any]:
    """The command line, UTC time, machine and commit of this process."""
    return {"command": _command(), "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "machine": {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "arch": platform.machine()},
            "torch": version("torch"), "commit": _commit()}  # the version without importing torch into a load client


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print `result` with its run record; also write it to `out` when given."""
    text = json.dumps({**result, "run": run_record()}, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
