"""`neuronguard serve`: run the guard server with uvicorn.

Every flag has a `NEURONGUARD_*` environment variable; a flag given on the command line
wins. Cheap checks (bundle fingerprint against the model config) run before the port is
bound, so a mismatched bundle stops start-up with one clear line (exit code 2).
"""

from __future__ import annotations

import argparse
import signal
from types import FrameType

from neuronguard.errors import UsageError
from neuronguard.server.guard import GUARD_MODES

_FLAGS: tuple[tuple[str, str, dict], ...] = (
    ("--model", "model", {"metavar": "PATH_OR_ID", "help": "served model (default: the built-in unaligned organism)"}),
    ("--bundle", "bundle", {"metavar": "DIR", "help": "guard bundle for the model (default: the organism's)"}),
    ("--patch-source", "patch_source", {"metavar": "PATH_OR_ID", "help": "aligned twin for live patching ('none' disables)"}),
    ("--served-model-name", "served_model_name", {"metavar": "NAME", "help": "model id shown to clients"}),
    ("--host", "host", {"help": "bind address (default 127.0.0.1)"}),
    ("--port", "port", {"type": int, "help": "port (default 8000)"}),
    ("--api-key", "api_keys", {"action": "append", "metavar": "KEY", "help": "accepted Bearer key (repeatable)"}),
    ("--device", "device", {"help": "auto, cpu, cuda, cuda:N"}),
    ("--dtype", "dtype", {"help": "auto, float32, bfloat16, float16"}),
    ("--guard-mode", "guard_mode", {"choices": GUARD_MODES, "help": "server guard policy (default block)"}),
    ("--patch-k", "patch_k", {"type": int, "help": "neurons patched live (default: the bundle's)"}),
    ("--max-queue", "max_queue", {"type": int, "help": "queued requests before 503 (default 64)"}),
    ("--max-body-bytes", "max_body_bytes", {"type": int, "help": "request body limit (default 1000000)"}),
    ("--log-prompts", "log_prompts", {"action": "store_const", "const": True, "help": "log prompt text"}),
    ("--allow-guard-override", "allow_guard_override", {"action": "store_const", "const": True,
                                                        "help": "let requests weaken the guard"}),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model behind the safety-neuron guard (OpenAI-compatible API)",
                                   description=__doc__.splitlines()[0])
    for flag, dest, options in _FLAGS:
        parser.add_argument(flag, dest=dest, default=None, **options)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(func=serve)


def _drained(_sig: int, _frame: FrameType | None) -> None:
    """Receives the signal uvicorn re-raises after its graceful shutdown: nothing left to do."""


def serve(args: argparse.Namespace) -> int:
    import uvicorn  # the CLI stays fast for other commands
    from pydantic import ValidationError

    from neuronguard.server.app import create_app
    from neuronguard.server.logging import configure_logging
    from neuronguard.server.runtime import preflight
    from neuronguard.server.settings import Settings

    overrides = {dest: getattr(args, dest) for _, dest, _ in _FLAGS if getattr(args, dest) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsageError(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    preflight(settings)
    configure_logging(args.log_level.upper())
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop_on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=stop_on_load_error)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.graceful_shutdown_s, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal into the handler installed before it
    # started: the default one kills the process (exit -15). A no-op one lets a drained server exit 0.
    previous = {sig: signal.signal(sig, _drained) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise UsageError(str(failed[0]) if isinstance(failed[0], UsageError) else f"loading failed: {failed[0]}")
    return 0
