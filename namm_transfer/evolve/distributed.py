"""Population members spread over processes (namm-spec.md §5.5), with ``torch.distributed``.

Launch with ``torchrun --nproc_per_node K ...`` or ``accelerate launch``: :meth:`World.from_env` reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and joins the process group (gloo on CPU, nccl when CUDA is
available), or reuses one that is already initialised. Without those variables (or with WORLD_SIZE 1) it
is a one-process world and no collective is ever called, so the same code path runs everywhere.

Protocol of one generation: rank 0 asks CMA-ES and broadcasts the (P, n) population; every rank
evaluates the contiguous slice :meth:`World.member_slice` of members (sizes differ by at most one);
per-member values come back to all ranks by an all-reduce (sum) of a zero-filled (P,) vector in which each
rank wrote only its own members, which is exact in floating point because every entry has a single
non-zero term. Rank 0 then tells CMA-ES and writes checkpoints; other ranks write nothing.

Splitting one member's prompts over several ranks (the official code does this when world > P) is not
implemented: ``world_size > population_size`` raises ValueError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


@dataclass(frozen=True)
class World:
    """The processes that share one evolution run.

    Attributes:
        rank: this process's rank, 0 = the one that runs CMA-ES and writes files.
        world_size: number of processes.
        device: where collective tensors live (``cuda:LOCAL_RANK`` for nccl, else cpu).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid World: rank {self.rank} with world_size {self.world_size}")

    @classmethod
    def from_env(cls, backend: str | None = None) -> "World":
        """The world of this process: the initialised process group if any, else RANK / WORLD_SIZE.

        Args:
            backend: "gloo" or "nccl"; default nccl when CUDA is available, else gloo.
        """
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        if world_size == 1:
            return cls()
        if not (dist.is_available() and dist.is_initialized()):
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", _env_int("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        return cls(rank=rank, world_size=world_size, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def member_slice(self, population_size: int) -> slice:
        """Contiguous members of this rank: the first ``P % world_size`` ranks get one extra member."""
        if self.world_size > population_size:
            raise ValueError(
                f"world_size {self.world_size} exceeds population_size {population_size}: splitting one "
                "member's prompts over ranks is not supported"
            )
        base, extra = divmod(population_size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def broadcast_population(self, population: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
        """Rank 0's (P, n) float64 population on every rank; other ranks pass None."""
        if self.world_size == 1:
            return population
        if self.is_main:
            tensor = torch.from_numpy(np.ascontiguousarray(population, dtype=np.float64)).to(self.device)
        else:
            tensor = torch.empty(shape, dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor.cpu().numpy()

    def gather_members(self, local: np.ndarray, population_size: int) -> np.ndarray:
        """(P,) float64 on every rank from each rank's (len(member_slice),) values, by a zero-filled sum."""
        members = self.member_slice(population_size)
        full = np.zeros(population_size, dtype=np.float64)
        full[members] = local
        if self.world_size == 1:
            return full
        tensor = torch.from_numpy(full).to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def broadcast_object(self, value):
        """Rank 0's picklable ``value`` on every rank (others pass anything, e.g. None)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]
