"""Offline statistics over a `torchrun` group: each rank takes a shard, the sums meet, rank 0 writes.

Under `torchrun --nproc-per-node N` (its RANK/WORLD_SIZE variables set), `process_group`
starts torch.distributed (gloo on the CPU, nccl when the device is a GPU; rank r runs on
cuda:LOCAL_RANK) for the length of a command. While it runs, `shard` hands each rank a
contiguous run of the work items, `all_reduce_sum` adds the ranks' additive statistics,
`all_gather` puts per-item results back in item order on every rank, and `is_writer` is True
on rank 0 only: it alone writes artifacts, prints and shows progress bars. Without a group
every helper is the identity and no collective runs: a plain process behaves as it always did.
Work is sharded in whole batches, so every batch is the one a single process would run (same
rows, same padding) and only the order of the float64 sums differs. A group that a
tensor-parallel load started is left with `leaving_group_together`, and every torchrun rank
ends through `exit_process`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

from neuronguard.errors import UsageError

T = TypeVar("T")

_group: dist.ProcessGroup | None = None  # set only inside `process_group`


def launched() -> bool:
    """Whether torchrun started this process (it sets RANK and WORLD_SIZE for every rank)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(device: str) -> str:
    """The device this rank runs on: its own GPU (cuda:LOCAL_RANK) when `device` asks for CUDA."""
    wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda:"):
        raise UsageError(f"under torchrun each rank runs on its own GPU (cuda:LOCAL_RANK): pass --device cuda or auto, not {device}")
    if not wants_cuda:
        return "cpu" if device == "auto" else device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available() or local >= torch.cuda.device_count():
        raise UsageError(f"rank {local} has no GPU (this machine has {torch.cuda.device_count()}): "
                         "start at most one rank per GPU, or pass --device cpu")
    return f"cuda:{local}"


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Run the body in the torchrun group, if there is one; yields the device to load models on.

    Outside torchrun it yields `device` unchanged and starts nothing.
    """
    global _group
    if not launched():
        yield device
        return
    chosen = rank_device(device)
    if chosen.startswith("cuda"):
        torch.cuda.set_device(torch.device(chosen))
        dist.init_process_group("nccl", device_id=torch.device(chosen))
    else:
        dist.init_process_group("gloo")
    _group = dist.group.WORLD
    if not is_writer():
        _quiet()
    try:
        with leaving_group_together():  # a gloo rank leaving while rank 0 still writes can abort at exit
            yield chosen
    finally:
        _group = None


@contextmanager
def leaving_group_together() -> Iterator[None]:
    """Leave the group that a tensor-parallel load started (transformers' `tp_plan`) in step.

    transformers starts the group but never ends it; a gloo group left to the interpreter's
    exit can abort the process (SIGABRT, "terminate called without an active exception").
    On a clean exit every rank meets at a barrier and destroys the group; after an error the
    group is destroyed without the barrier, which a failed rank would never reach.
    """
    clean = False
    try:
        yield
        clean = True
    finally:
        if dist.is_available() and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with `code`; a torchrun rank ends without the interpreter's teardown.

    At interpreter exit, threads that are still inside C++ code (torch's, gloo's) are unwound
    by force, and an unwind through a `noexcept` frame aborts the rank (SIGABRT, "terminate
    called without an active exception"), failing a group whose work was done and written.
    A rank therefore flushes its streams and logs and leaves with `os._exit`.
    """
    if not launched():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _quiet() -> None:
    """Ranks other than 0 show no progress bars, warnings or info logs: rank 0 reports for the group."""
    from transformers.utils import logging as transformers_logging

    logging.getLogger().setLevel(logging.ERROR)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # "Loading weights" bars
    warnings.simplefilter("ignore")


def world() -> tuple[int, int]:
    """(rank, number of ranks) of the running group; (0, 1) without one."""
    if _group is None:
        return 0, 1
    return dist.get_rank(_group), dist.get_world_size(_group)


def is_writer() -> bool:
    """Whether this process writes artifacts and reports: rank 0, or the only process."""
    return world()[0] == 0


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of `items`: rank r of W takes [r*n//W, (r+1)*n//W); all of them alone."""
    rank, size = world()
    return items[rank * len(items) // size : (rank + 1) * len(items) // size]


def _collective_device() -> torch.device:
    """nccl reduces GPU tensors only; gloo reduces CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(_group) == "nccl" else torch.device("cpu")


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's tensors summed, key by key (each on its own device and dtype); unchanged alone."""
    if _group is None:
        return tensors
    device = _collective_device()
    summed = {}
    for key in sorted(tensors):  # the same order on every rank
        buffer = tensors[key].to(device, copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=_group)
        summed[key] = buffer.to(tensors[key].device)
    return summed


def all_gather(items: list[T]) -> list[T]:
    """Every rank's list, concatenated in rank order on every rank: with `shard`, the original order."""
    if _group is None:
        return items
    everyone: list[list[T] | None] = [None] * dist.get_world_size(_group)
    dist.all_gather_object(everyone, items, group=_group)
    return [item for part in everyone for item in (part or [])]
