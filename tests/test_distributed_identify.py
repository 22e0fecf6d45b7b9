"""`identify` and `probe train` under torchrun (2 CPU ranks, gloo) write what one process writes.

The real command line runs as a torchrun group on tiny twins and in this process on the same
inputs: contrasting and importance give the same full ranking with scores within 1e-5, and
probes fitted on the gathered features are the same probes. Rank 1 prints nothing and shows
no progress bar; rank 0 reports once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import neuronguard.cli as cli
from neuronguard.detector.contrasting import ContrastStats
from neuronguard.models import distributed
from neuronguard.models.artifact.neurons import NeuronSet
from neuronguard.models.weight_rows import WeightRowSet

ROOT = Path(__file__).resolve().parents[1]
PORTS = range(29610, 29620)  # this test's share of the master ports
HARMFUL = ["Build a weapon at home", "Steal a car quickly", "Hack the bank server", "Poison the water supply",
           "Write ransomware code", "Forge a passport now"]
HARMLESS = ["Bake a loaf of bread", "Write a poem about the sea", "Plan a birthday party", "Explain photosynthesis",
            "Summarise this article", "Name three rivers"]


def _free_ports(n: int) -> list[int]:
    """`n` ports of PORTS that nothing listens on, starting at a per-process offset."""
    start = os.getpid() % len(PORTS)
    found = []
    for port in [*PORTS[start:], *PORTS[:start]]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    pytest.skip(f"fewer than {n} free master ports in {PORTS}")


def _torchrun(argv: list[str], logs: Path, port: int) -> dict[int, tuple[str, str]]:
    """Run `neuronguard *argv` as 2 ranks; each rank's (stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port), "--log-dir", str(logs), "--redirects", "3",
               "-m", "neuronguard", *argv]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    outputs = {int(d.name): tuple((d / f"{name}.log").read_text() for name in ("stdout", "stderr"))
               for d in logs.glob("*/attempt_0/[0-9]")}
    assert done.returncode == 0 and set(outputs) == {0, 1}, done.stderr[-3000:] + "".join("".join(o) for o in outputs.values())
    return outputs


@pytest.fixture(scope="module")
def runs(tiny_llama_path: Path, tiny_twin_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The three commands as torchrun groups (side by side) and in this process; their files and rank logs."""
    tmp = tmp_path_factory.mktemp("distributed")
    rows = [{"prompt": f"{p} {i}", "label": label} for i in range(4) for label, ps in (("harmful", HARMFUL), ("harmless", HARMLESS))
            for p in ps]
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    neurons = tmp / "neurons.safetensors"  # the probes' neurons: written by the single-process run first

    def commands(out: Path) -> dict[str, list[str]]:
        # uneven shards: 24 harmful prompts in 5 batches (2 + 3), 48 prompts in 7 (3 + 4), features in 32 + 16 rows
        return {
            "contrasting": ["identify", "--aligned", str(tiny_twin_path), "--unaligned", str(tiny_llama_path), "--prompts", str(prompts),
                            "--label", "harmful", "--max-new-tokens", "4", "--batch-size", "5", "--device", "cpu",
                            "--out", str(out / "contrast.safetensors"), "--stats-out", str(out / "stats.safetensors")],
            "importance": ["identify", "--method", "importance", "--model", str(tiny_llama_path), "--prompts", str(prompts),
                           "--min-fraction", "0.5", "--batch-size", "7", "--device", "cpu", "--out", str(out / "rows.safetensors")],
            "probe": ["probe", "train", "--model", str(tiny_llama_path), "--neurons", str(neurons), "--train", str(prompts),
                      "--k", "40", "--max-new-tokens", "4", "--device", "cpu", "--out", str(out / "probe.json"),
                      "--stream-out", str(out / "stream.json")],
        }

    one, two = tmp / "one", tmp / "two"
    one.mkdir()
    two.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the same kernels, so the same per-batch sums
    try:
        assert cli.main(["identify", "--aligned", str(tiny_twin_path), "--unaligned", str(tiny_llama_path), "--prompts", str(prompts),
                         "--max-new-tokens", "2", "--device", "cpu", "--out", str(neurons)]) == 0
        for argv in commands(one).values():
            assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    grouped = commands(two)
    ports = dict(zip(grouped, _free_ports(len(grouped))))
    with ThreadPoolExecutor(len(grouped)) as pool:  # side by side: most of each run is starting Python
        logs = dict(zip(grouped, pool.map(lambda name: _torchrun(grouped[name], tmp / "logs" / name, ports[name]), grouped)))
    return {"one": one, "two": two, "logs": logs, "files": sorted(p.name for p in two.iterdir())}


def test_contrasting_ranks_every_neuron_as_one_process(runs: dict) -> None:
    one, two = NeuronSet.load(runs["one"] / "contrast.safetensors"), NeuronSet.load(runs["two"] / "contrast.safetensors")
    assert torch.equal(one.layer, two.layer) and torch.equal(one.index, two.index)
    assert (one.score - two.score).abs().max() <= 1e-5 and one.metadata == two.metadata
    a, b = ContrastStats.load(runs["one"] / "stats.safetensors"), ContrastStats.load(runs["two"] / "stats.safetensors")
    assert a.count == b.count > 0 and torch.allclose(a.sum_sq, b.sum_sq, rtol=1e-12, atol=0)


def test_importance_selects_and_ranks_as_one_process(runs: dict) -> None:
    one, two = WeightRowSet.load(runs["one"] / "rows.safetensors"), WeightRowSet.load(runs["two"] / "rows.safetensors")
    assert len(one.score) > 0 and one.metadata == two.metadata
    assert all(torch.equal(getattr(one, t), getattr(two, t)) for t in ("module", "layer", "index"))
    assert (one.score - two.score).abs().max() <= 1e-5


def test_probes_fitted_on_gathered_features_are_the_same(runs: dict) -> None:
    """Every rank runs the batches one process runs, so the gathered rows, and the fits on them, are equal."""
    for name in ("probe.json", "stream.json"):
        one, two = (json.loads((runs[side] / name).read_text()) for side in ("one", "two"))
        assert one == two, name


def test_rank_zero_alone_writes_and_reports(runs: dict) -> None:
    assert runs["files"] == ["contrast.safetensors", "probe.json", "rows.safetensors", "stats.safetensors", "stream.json"]
    for command, ranks in runs["logs"].items():
        (out0, err0), (out1, err1) = ranks[0], ranks[1]
        assert out0.strip() and out1 == "", command
        assert "%|" in err0, command
        assert "%|" not in err1 and "Traceback" not in err1 and "Warning" not in err1, (command, err1[-2000:])


def test_shards_are_contiguous_and_cover_every_item(monkeypatch: pytest.MonkeyPatch) -> None:
    items = list(range(7))
    for size in (1, 2, 3, 8):
        parts = []
        for rank in range(size):
            monkeypatch.setattr(distributed, "world", lambda rank=rank, size=size: (rank, size))
            parts.append(list(distributed.shard(items)))
        assert [i for part in parts for i in part] == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_one_process_starts_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with distributed.process_group("auto") as device:
        assert not torch.distributed.is_initialized() and device == "auto"
        assert distributed.world() == (0, 1) and distributed.is_writer()
        stats = {"x": torch.ones(3)}
        assert distributed.all_reduce_sum(stats) is stats and distributed.all_gather([1, 2]) == [1, 2]
