"""`neuronguard inspect`: show how a checkpoint's neurons are addressed before any offline work."""

from __future__ import annotations

import argparse
import json

from neuronguard.models.arguments import add_model_arguments, load_from_args


def _inspect(args: argparse.Namespace) -> int:
    loaded = load_from_args(args.model, args)
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
    add_model_arguments(parser, model="required", architecture=True)
    parser.set_defaults(func=_inspect)
