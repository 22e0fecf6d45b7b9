"""`serve --tensor-parallel-size N`: one process per rank, started by torchrun's launcher.

`neuronguard serve` checks everything it can (settings, port, model, bundle) once, then
re-runs itself as a torchrun group of N processes on this machine. Rank 0 is the server: it
binds the port, takes the requests and drives the batching engine; the other ranks load the
same model slices and follow the engine's steps until rank 0 shuts it down. A SIGTERM
reaches every rank (torchrun forwards it): rank 0 drains, the followers keep stepping until
it has, and they ignore the signal themselves, since a follower that left would stall the group.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from neuronguard.errors import UsageError
from neuronguard.server.settings import Settings

log = logging.getLogger("neuronguard.server")


def group_rank(settings: Settings) -> int | None:
    """This process's rank in the torchrun group, or None when torchrun has not started one."""
    from neuronguard.models.distributed import launched

    if not launched():
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world != settings.tensor_parallel_size:
        raise UsageError(f"torchrun started {world} processes for --tensor-parallel-size {settings.tensor_parallel_size} "
                         "(fix: let `neuronguard serve` start the ranks itself, or match --nproc-per-node)")
    return int(os.environ["RANK"])


def shutdown_timeout_s(settings: Settings) -> int:
    """How long torchrun waits after forwarding SIGTERM before it kills the ranks: the server's whole
    drain (uvicorn's HTTP drain, then the engine's, each up to --graceful-shutdown-s) and a margin."""
    return int(2 * settings.graceful_shutdown_s) + 15


def launch(settings: Settings) -> int:
    """Run this same `serve` command as one process per rank on this machine; the exit status of the group."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", "--nnodes", "1", "--nproc-per-node", str(settings.tensor_parallel_size),
                  "--shutdown-timeout", str(shutdown_timeout_s(settings)), "-m", "neuronguard", *sys.argv[1:]])
    except SignalException:  # SIGTERM/SIGINT: torchrun forwarded it and waited for the ranks to drain and exit
        return 0
    except ChildFailedError as exc:
        failures = exc.failures
        first = failures[min(failures)] if failures else None
        raise UsageError(f"a tensor-parallel rank failed (exit {first.exitcode if first else '?'}): "
                         "the rank's own log line above says why") from None
    return 0


def follow(settings: Settings) -> int:
    """A rank other than 0: load this rank's slices, then run the engine's steps as rank 0 drives them."""
    from neuronguard.models.distributed import leaving_group_together
    from neuronguard.server.app import start_engine
    from neuronguard.server.logging import configure_logging
    from neuronguard.server.runtime import load_runtime

    configure_logging(settings.log_level.upper())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    with leaving_group_together():
        runtime = load_runtime(settings)
        engine = start_engine(runtime, settings)
        log.info("following rank 0", extra={"rank": int(os.environ["RANK"])})
        try:
            engine.wait()
        finally:
            engine.shutdown(drain=False)
    return 0
