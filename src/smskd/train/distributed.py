"""Multi-process training with PyTorch's own machinery: ``torchrun`` + DDP.

``torchrun --nproc_per_node=N -m smskd distill CONFIG`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`setup` joins
the process group (NCCL on GPUs, Gloo on CPUs) and picks this rank's device.
Nothing here is a scheme of our own: gradients are synchronized by
``DistributedDataParallel``, metrics by ``all_reduce``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from smskd.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Dist:
    """This process's place in the job (a single process when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Dist()


def setup(device: str) -> tuple[Dist, str]:
    """Join the process group when launched by ``torchrun``; return it and the device.

    ``device`` "auto" becomes this rank's GPU (``cuda:LOCAL_RANK``) when CUDA is there.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), device
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current(), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        # All ranks arrive before any leaves: a rank that destroys the group while
        # another still talks to it aborts the process.
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place, returned); a no-op in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a stop request)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics).

    DDP broadcasts them at the start of each forward, so between epochs each rank
    still holds its own last update: evaluation, the checkpoint and the next
    stage's reference must all see the same model.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def data_parallel(student: nn.Module, helpers: list[nn.Module], device: torch.device) -> nn.Module:
    """DDP over the student and a stage's helpers (its methods); teacher and reference
    stay plain. Call it with the stage's taps in place; the result runs the student."""
    from torch.nn.parallel import DistributedDataParallel

    trainable = _StudentAndHelpers(student, helpers)
    # Method buffers (CRD's memory banks) are kept equal by the method itself, which
    # gathers every rank's update; broadcasting them from rank 0 each step would
    # only move megabytes for nothing.
    ignored = [f"methods.{name}" for name, _ in trainable.methods.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trainable, ignored)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(trainable, device_ids=device_ids)


class _StudentAndHelpers(nn.Module):
    """Student plus the stage's helpers, as one module for DDP to synchronize.

    Its forward is the student's: the helpers get their gradients in the loss, and
    DDP averages every parameter's gradient as it becomes ready, used in this
    forward or not.
    """

    def __init__(self, student: nn.Module, helpers: list[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.methods = nn.ModuleList(helpers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)
