"""Training on several processes with torch.distributed (``torchrun``): NCCL on GPUs, gloo on CPUs.

Every process holds the whole model. The global batch is the one a single process would use:
each is cut into ``world`` slices (process ``rank`` takes every ``world``-th image of it), each
process computes the summed loss of its slice, and the gradients are summed over the processes
and divided by the global batch's readable images, so N processes take the same optimizer steps
as one. Only process 0 writes checkpoints, history and logs; every process reads a resumed run.

Gradients are all-reduced by hand rather than through ``DistributedDataParallel``: a process
may hold no readable image of a global batch (a short last batch, unreadable files), which DDP's
bucketed hooks cannot skip without stalling the others.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (``world`` 1: no torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per process: ``cuda:LOCAL_RANK`` when CUDA was asked for."""
        if self.world > 1 and requested.type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
        return requested

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the parameters' gradients over the processes (a missing gradient counts as zero)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset: offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order (picklable objects)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


ONE = Processes()  # a single process


def from_environment() -> Processes:
    """The process group ``torchrun`` describes in the environment (started here if needed), or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ONE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size())


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's slice of each global batch of a seeded permutation (or of the data in order)."""

    def __init__(self, size: int, batch_size: int, processes: Processes, seed: int | None):
        self.size, self.batch_size, self.processes, self.seed = size, batch_size, processes, seed

    def __iter__(self) -> Iterator[list[int]]:
        order = (torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed))
                 if self.seed is not None else torch.arange(self.size))
        for start in range(0, self.size, self.batch_size):
            yield order[start: start + self.batch_size][self.processes.rank:: self.processes.world].tolist()

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)
