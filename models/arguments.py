"""Command-line options of every command that loads a model: one spelling, one default.

Importing this module imports neither torch nor transformers, so `neuronguard --help` stays
fast; `load_from_args` imports the loader only when a command runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Literal

from neuronguard.errors import UsageError

if TYPE_CHECKING:
    from neuronguard.models.loading import LoadedModel
    from neuronguard.models.sites import SiteOverride

DEFAULT_DEVICE = "auto"  # the first GPU when there is one, else the CPU
DEFAULT_DTYPE = "auto"  # the checkpoint's own dtype on a GPU, float32 on the CPU
MODEL_HELP = "local checkpoint directory, or a hub id already in the HF cache"


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    model: Literal["required", "optional", "repeated"] | None = None,
    batch_size: int | None = None,
    architecture: bool = False,
    defaults: bool = True,
) -> None:
    """Add `--device` and `--dtype`, plus the options asked for.

    - `model`: a `--model` flag, required, optional, or repeatable (one value per use);
    - `batch_size`: a `--batch-size` flag with this default;
    - `architecture`: `--trust-remote-code`, `--layers-path` and `--down-path` (`load_from_args`
      reads them), for checkpoints whose modelling code or block layout the resolver does not know;
    - `defaults=False` leaves unset flags at None, for a command whose settings also come from
      elsewhere (the server's environment variables); the documented defaults stay the same.
    """
    if model is not None:
        parser.add_argument("--model", required=model != "optional", action="append" if model == "repeated" else "store",
                            help=MODEL_HELP + (" (repeat to compare)" if model == "repeated" else ""))
    parser.add_argument("--device", default=DEFAULT_DEVICE if defaults else None,
                        help=f"cpu, cuda, cuda:N or auto: the first GPU if there is one (default: {DEFAULT_DEVICE})")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE if defaults else None,
                        help=f"auto, float32, bfloat16 or float16; auto is float32 on the CPU (default: {DEFAULT_DTYPE})")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size, help=f"sequences per forward pass (default: {batch_size})")
    if architecture:
        parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own modelling code")
        parser.add_argument("--layers-path", help="dotted path of the decoder block list, for unknown architectures")
        parser.add_argument("--down-path", help="path of the MLP down projection inside a block, for unknown architectures")


def site_override(args: argparse.Namespace) -> SiteOverride | None:
    """The `--layers-path`/`--down-path` override, if given (both or neither)."""
    layers, down = getattr(args, "layers_path", None), getattr(args, "down_path", None)
    if not (layers or down):
        return None
    if not (layers and down):
        raise UsageError("--layers-path and --down-path go together: give both")
    from neuronguard.models.sites import SiteOverride

    return SiteOverride(layers=layers, down=down)


def load_from_args(path: str, args: argparse.Namespace) -> LoadedModel:
    """Load `path` with the options `add_model_arguments` put on `args`."""
    from neuronguard.models.loading import load_model

    return load_model(path, args.device, args.dtype, trust_remote_code=getattr(args, "trust_remote_code", False),
                      site_override=site_override(args))
