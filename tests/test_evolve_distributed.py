"""Population members over ranks (namm_transfer.evolve.distributed): namm-spec.md §5.5, gloo on CPU."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from namm_transfer.evolve.distributed import World
from namm_transfer.evolve.loop import FitnessResult, Stage, evolve
from namm_transfer.evolve.state import read_log, resume
from namm_transfer.evolve.strategy import EvolutionConfig

CONFIG = EvolutionConfig(num_params=10, population_size=5, sigma0=0.3, seed=4)
STAGES = [Stage("first", ["a"], 2), Stage("second", ["a", "b"], 2)]


class Fitness:
    """-||x - scale * target||^2 plus a toy per-member metric; records the rows it was given."""

    def __init__(self, record_dir: Path, rank: int) -> None:
        self.record_dir, self.rank = Path(record_dir), rank

    def __call__(self, members, generation, stage, statistics):
        np.save(self.record_dir / f"rank{self.rank}-gen{generation}.npy", members)
        target = statistics["scale"] * np.linspace(-1.0, 1.0, members.shape[1])
        return FitnessResult(-((members - target) ** 2).sum(axis=1), {"kv_fraction": np.abs(members).mean(axis=1)})


class Hook:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self):
        with open(self.path, "a") as handle:
            handle.write("called\n")
        return {"scale": np.array(0.75)}


def _worker(rank: int, world_size: int, port: int, base: str) -> None:
    """One spawned rank: joins the gloo group through the torchrun environment variables and evolves."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    world = World.from_env(backend="gloo")
    assert (world.rank, world.world_size) == (rank, world_size)
    base = Path(base)
    evolve(Fitness(base, rank), CONFIG, base / f"run-rank{rank}", STAGES,
           estimate_statistics=Hook(base / f"hook-rank{rank}"), world=world, progress=False)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_member_slices_are_contiguous_and_cover_the_population():
    slices = [World(rank, 3).member_slice(10) for rank in range(3)]
    assert slices == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert [World(rank, 2).member_slice(4) for rank in range(2)] == [slice(0, 2), slice(2, 4)]
    with pytest.raises(ValueError, match="exceeds population_size"):
        World(0, 6).member_slice(5)
    with pytest.raises(ValueError, match="invalid World"):
        World(2, 2)


def test_one_process_world_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = World.from_env()
    assert (world.rank, world.world_size, world.is_main) == (0, 1, True)
    population = np.arange(6.0).reshape(3, 2)
    assert world.broadcast_population(population, (3, 2)) is population
    assert world.gather_members(np.array([1.5, 2.5, 3.5]), 3).tolist() == [1.5, 2.5, 3.5]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        World.from_env()


def test_two_gloo_processes_log_the_same_fitness_as_one(tmp_path):
    single = evolve(Fitness(tmp_path, rank=9), CONFIG, tmp_path / "single", STAGES,
                    estimate_statistics=Hook(tmp_path / "hook-single"), progress=False)

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    two_log, one_log = read_log(tmp_path / "run-rank0"), read_log(tmp_path / "single")
    assert [r["generation"] for r in two_log] == [0, 1, 2, 3]
    assert [r["member_fitness"] for r in two_log] == [r["member_fitness"] for r in one_log]
    assert [r["extra"] for r in two_log] == [r["extra"] for r in one_log]
    assert np.array_equal(resume(tmp_path / "run-rank0").strategy.mean, single.strategy.mean)
    for g in range(4):
        whole = np.load(tmp_path / f"rank9-gen{g}.npy")
        assert np.array_equal(np.load(tmp_path / f"rank0-gen{g}.npy"), whole[:3])
        assert np.array_equal(np.load(tmp_path / f"rank1-gen{g}.npy"), whole[3:])
    assert (tmp_path / "hook-rank0").read_text() == "called\n"
    assert not (tmp_path / "hook-rank1").exists()  # statistics reach rank 1 by broadcast
    assert not (tmp_path / "run-rank1").exists()  # only rank 0 writes the run folder
