"""Training on several processes with torch.distributed (``torchrun``): NCCL on GPUs, gloo on CPUs.

Every process holds the whole model and trains it through ``DistributedDataParallel``. The global
batch is the one a single process would use: each is cut into ``world`` slices (process ``rank``
takes every ``world``-th image of it), each process computes the summed loss of its slice, and DDP
averages the gradients over the processes; scaling each process's loss by ``world / readable images
of the global batch`` makes that average the gradient of the global batch's mean loss, so N
processes take the same optimizer steps as one. Validation is sharded the same way and its logits
gathered, so every process takes the same decisions (best epoch, early stopping). Only process 0
writes checkpoints, history and logs; every process reads a resumed run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
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
            return torch.device("cuda", local_rank(self.rank))
        return requested

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

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

    def parallel(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` in ``DistributedDataParallel`` on several processes (its parameters broadcast from process
        0), as it is on one."""
        if self.world == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


ONE = Processes()  # a single process


def local_rank(rank: int = 0) -> int:
    """This process's index on its machine (``torchrun`` sets ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", rank))


def from_environment(device: torch.device) -> Processes:
    """The process group ``torchrun`` describes in the environment (started here if needed), or one process.

    Training on CUDA: NCCL for tensors on the GPUs (DDP's gradients), gloo for those on the CPU
    (the counts and gathered objects the loop exchanges); on the CPU: gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ONE
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank())
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size())


class Trainee(nn.Module):
    """What a training step runs (and DDP wraps): the classifier on images or on cached embeddings, over the
    trained parameters only.

    The classifier is held outside the module tree, so DDP sees just the trained parameters (the
    frozen encoder of head-only strategies has no gradient to wait for) and no buffers.
    """

    def __init__(self, classifier: nn.Module, trained: list[nn.Parameter], images: bool):
        super().__init__()
        self.trained = nn.ParameterList(trained)  # the classifier's own Parameter objects, registered here too
        self._classifier = (classifier,)  # a tuple: not a submodule
        self.images = images

    def forward(self, inputs: torch.Tensor | None) -> torch.Tensor:
        """Region logits of ``inputs``; ``None`` (this process's slice of the global batch has no readable
        image): a zero that depends on every trained parameter.

        A process with nothing to train on must still run a backward: DDP all-reduces each
        gradient bucket once every process has filled it, so the others would wait for this one
        forever. A zero-size batch cannot stand in (open_clip's ViT cannot reshape it), and a
        dummy image would move normalisation statistics; this zero gives each parameter a zero
        gradient, which adds nothing to the average.
        """
        if inputs is None:
            return sum(p.sum() for p in self.trained) * 0.0
        classifier = self._classifier[0]
        return classifier(inputs) if self.images else classifier.classify(inputs)


def sync_unless(accumulating: bool, trainee: nn.Module):
    """DDP's ``no_sync()`` while gradients accumulate over batches before an optimizer step (nothing on one
    process): the all-reduce then runs once, in the step's last backward."""
    if accumulating and isinstance(trainee, DistributedDataParallel):
        return trainee.no_sync()
    return contextlib.nullcontext()


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
