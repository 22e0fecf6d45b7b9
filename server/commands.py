"""`neuronguard serve`: run the guard server with uvicorn.

Every setting is a flag and a `NEURONGUARD_*` environment variable; a flag given on the
command line wins. Every check that needs no weights (settings, model and patch source,
bundle fingerprint, the port) runs before the model loads, so a mistake stops start-up
with one line and exit code 2. Building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
from types import FrameType
from typing import Any

from neuronguard.errors import UsageError
from neuronguard.models.arguments import add_model_arguments
from neuronguard.server.guard import GUARD_MODES

_SWITCH = {"action": argparse.BooleanOptionalAction}
# (flag, Settings field, argparse options); with the shared model flags (MODEL_FLAGS) they cover every
# field of Settings (a test checks).
_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--model", "model", {"metavar": "PATH_OR_ID", "help": "served model (default: the built-in unaligned organism)"}),
    ("--bundle", "bundle", {"metavar": "DIR", "help": "guard bundle for the model (default: the organism's); "
                                                      "'none' serves unguarded, with --guard-mode off"}),
    ("--patch-source", "patch_source", {"metavar": "PATH_OR_ID",
                                        "help": "aligned twin for live patching (default: the organism's); 'none' disables"}),
    ("--served-model-name", "served_model_name", {"action": "append", "metavar": "NAME",
                                                  "help": "model id shown to clients (repeatable: the first names the "
                                                          "model, requests must name one of them)"}),
    ("--host", "host", {"help": "bind address (default 127.0.0.1)"}),
    ("--port", "port", {"type": int, "help": "port (default 8000)"}),
    ("--api-key", "api_keys", {"action": "append", "metavar": "KEY", "help": "accepted Bearer key (repeatable)"}),
    ("--guard-mode", "guard_mode", {"choices": GUARD_MODES, "help": "server guard policy (default block)"}),
    ("--patch-k", "patch_k", {"type": int, "help": "neurons patched live (default: the bundle's)"}),
    ("--engine", "engine", {"choices": ("batched", "serial"),
                            "help": "'batched': continuous batching, many requests per step; 'serial': one request "
                                    "at a time, the fallback (default batched)"}),
    ("--tensor-parallel-size", "tensor_parallel_size",
     {"type": int, "metavar": "N", "help": "shard the model over N ranks, one process each (torchrun on this machine); "
                                           "needs --engine batched (default 1)"}),
    ("--engine-kv-blocks", "engine_kv_blocks", {"type": int, "metavar": "N",
                                                "help": "batched engine: KV cache blocks of 32 tokens, shared by all "
                                                        "requests (default 256)"}),
    ("--engine-max-batch-tokens", "engine_max_batch_tokens", {"type": int, "metavar": "N",
                                                              "help": "batched engine: tokens per step; longer prompts "
                                                                      "prefill in chunks (default 256)"}),
    ("--max-queue", "max_queue", {"type": int, "help": "queued jobs (one per choice) before 503; with --engine batched, "
                                                       "requests in flight (default 64)"}),
    ("--max-tokens-default", "max_tokens_default", {"type": int, "metavar": "N",
                                                    "help": "chat tokens when a request sets no max_tokens (default 256)"}),
    ("--max-body-bytes", "max_body_bytes", {"type": int, "help": "request body limit (default 1000000)"}),
    ("--refusal-message", "refusal_message", {"metavar": "TEXT", "help": "answer to a blocked request"}),
    ("--graceful-shutdown-s", "graceful_shutdown_s", {"type": float, "metavar": "S",
                                                      "help": "seconds running requests get after SIGTERM (default 30)"}),
    ("--log-level", "log_level", {"choices": ("debug", "info", "warning", "error"), "help": "default info"}),
    ("--log-prompts", "log_prompts", {**_SWITCH, "help": "log prompt text (default off)"}),
    ("--allow-guard-override", "allow_guard_override", {**_SWITCH, "help": "let requests weaken the guard (default off)"}),
    ("--allow-weights-mismatch", "allow_weights_mismatch",
     {**_SWITCH, "help": "serve a bundle fitted to other weights of the same architecture (default off)"}),
)
MODEL_FLAGS = ("device", "dtype")  # from add_model_arguments: one spelling and default for every command
SETTINGS = tuple(dest for _, dest, _ in _FLAGS) + MODEL_FLAGS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model behind the safety-neuron guard (OpenAI-compatible API)",
                                   description=__doc__.splitlines()[0],
                                   epilog="Every flag is also an environment variable: --max-queue is NEURONGUARD_MAX_QUEUE.")
    for flag, dest, options in _FLAGS:
        options = {**options, "help": f"{options['help']} [env NEURONGUARD_{dest.upper()}]"}
        parser.add_argument(flag, dest=dest, default=None, **options)
    add_model_arguments(parser, defaults=False)  # --device, --dtype
    parser.set_defaults(func=serve)


def _drained(_sig: int, _frame: FrameType | None) -> None:
    """Receives the signal uvicorn re-raises after its graceful shutdown: nothing left to do."""


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads: a taken port stops start-up at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve host '{host}': {exc.strerror} (fix: pass --host 127.0.0.1 or 0.0.0.0)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use (fix: stop the other server or pass --port)") from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror} (fix: pass another --host or --port)") from None
    return sock


def serve(args: argparse.Namespace) -> int:
    import uvicorn  # the CLI stays fast for other commands
    from pydantic import ValidationError

    from neuronguard.server.logging import configure_logging
    from neuronguard.server.settings import Settings

    overrides = {dest: getattr(args, dest) for dest in SETTINGS if getattr(args, dest) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(map(str, first["loc"]))
        raise UsageError(f"invalid setting {name}: {first['msg']} "
                         f"(fix: correct --{name.replace('_', '-')} or NEURONGUARD_{name.upper()})") from None
    if settings.tensor_parallel_size > 1:
        from neuronguard.server import tensor_parallel

        rank = tensor_parallel.group_rank(settings)
        if rank is None:  # not launched yet: check everything, then start one process per rank (rank 0 binds)
            from neuronguard.server.runtime import preflight

            preflight(settings)
            bind(settings.host, settings.port).close()
            return tensor_parallel.launch(settings)
        if rank > 0:
            return tensor_parallel.follow(settings)
    sock = bind(settings.host, settings.port)
    try:
        from neuronguard.models.distributed import leaving_group_together
        from neuronguard.server.app import create_app
        from neuronguard.server.runtime import preflight

        preflight(settings)
    except BaseException:
        sock.close()
        raise
    configure_logging(settings.log_level.upper())
    logging.getLogger("neuronguard.server").info("listening", extra={"host": settings.host, "port": sock.getsockname()[1]})
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop_on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=stop_on_load_error)
    config = uvicorn.Config(app, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.graceful_shutdown_s, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal into the handler installed before it
    # started: the default one kills the process (exit -15). A no-op one lets a drained server exit 0.
    previous = {sig: signal.signal(sig, _drained) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with leaving_group_together():  # rank 0 of a tensor-parallel group leaves with the followers
            server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise UsageError(str(failed[0]) if isinstance(failed[0], UsageError) else f"loading failed: {failed[0]}")
    return 0
