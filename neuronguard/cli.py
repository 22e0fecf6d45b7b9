"""`neuronguard` command line: one entry point, subcommands contributed by each package.

Each module in COMMAND_MODULES exposes `register(subparsers)`; it adds its subcommands and
sets `func` on them. User errors raise `UsageError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from neuronguard.errors import UsageError

COMMAND_MODULES: tuple[str, ...] = (
    "neuronguard.detector.commands",
    "neuronguard.server.commands",
    "neuronguard.models.commands",
    "neuronguard.models.organism.commands",
    "neuronguard.models.tuning.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuronguard",
        description="Safety-neuron guard for LLMs: find neurons, train probes, tune, and serve.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UsageError as exc:
        print(f"neuronguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuronguard: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
