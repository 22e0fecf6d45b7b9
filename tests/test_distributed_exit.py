"""How a torchrun rank leaves: the group torn down in step, the process ended without interpreter teardown."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from neuronguard.models import distributed


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo group of one rank, as transformers' tensor-parallel load leaves behind."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_leaving_together_destroys_the_group_after_the_barrier(one_rank_group, monkeypatch: pytest.MonkeyPatch) -> None:
    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (barriers.append(1), real_barrier(*a, **k)))
    with distributed.leaving_group_together():
        assert dist.is_initialized()
    assert not dist.is_initialized()
    assert barriers == [1]


def test_leaving_after_an_error_skips_the_barrier_a_failed_rank_never_reaches(one_rank_group, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: pytest.fail("barrier after an error"))
    with pytest.raises(RuntimeError, match="step failed"):
        with distributed.leaving_group_together():
            raise RuntimeError("step failed")
    assert not dist.is_initialized()


def test_leaving_without_a_group_does_nothing() -> None:
    assert not dist.is_initialized()
    with distributed.leaving_group_together():
        pass
    assert not dist.is_initialized()


def test_a_plain_process_exits_normally(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.os, "_exit", lambda code: pytest.fail("os._exit outside torchrun"))
    with pytest.raises(SystemExit) as exited:
        distributed.exit_process(3)
    assert exited.value.code == 3


def test_a_torchrun_rank_ends_with_os_exit_and_its_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    codes = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise SystemExit(code)  # stands in for os._exit, which would end pytest itself

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    with pytest.raises(SystemExit):
        distributed.exit_process(4)
    assert codes == [4]
