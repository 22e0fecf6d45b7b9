"""`neuronguard inspect`: show how a checkpoint's neurons are addressed before any offline work."""

from __future__ import annotations

import argparse
import json

from neuronguard.models.loading import load_model
from neuronguard.models.sites import SiteOverride


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options every command that loads a model shares."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own modelling code")
    parser.add_argument("--layers-path", help="dotted path of the decoder block list, for unknown architectures")
    parser.add_argument("--down-path", help="path of the MLP down projection inside a block, for unknown architectures")


def site_override(args: argparse.Namespace) -> SiteOverride | None:
    if args.layers_path or args.down_path:
        from neuronguard.errors import UsageError

        if not (args.layers_path and args.down_path):
            raise UsageError("--layers-path and --down-path go together: give both")
        return SiteOverride(layers=args.layers_path, down=args.down_path)
    return None


def _inspect(args: argparse.Namespace) -> int:
    loaded = load_model(
        args.model, args.device, args.dtype, trust_remote_code=args.trust_remote_code, site_override=site_override(args)
    )
    first = loaded.sites.layers[0]
    print(
        json.dumps(
            {
                "model": loaded.name,
                "model_type": loaded.model.config.model_type,
                "config_sha256": loaded.fingerprint,
                "layers": loaded.sites.num_layers,
                "layers_path": loaded.sites.layers_path,
                "neuron_site": f"{loaded.sites.layers_path}.N.{loaded.sites.down_path} (input)",
                "d_mlp": loaded.sites.d_mlp,
                "neurons": loaded.sites.num_neurons,
                "attention_projections": [name for name in ("q", "k", "v", "o") if getattr(first, name) is not None],
                "context_length": loaded.context_length,
                "chat_template": "model" if loaded.tokenizer.chat_template else "fallback",
            },
            indent=2,
        )
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="show a checkpoint's neuron sites, width and fingerprint")
    parser.add_argument("--model", required=True, help="local checkpoint directory or hub id")
    add_model_options(parser)
    parser.set_defaults(func=_inspect)
