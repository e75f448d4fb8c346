"""Scale-out: the same training loop under `torchrun --nproc_per_node=N`.

Design choices:
- The process group is set up from torchrun's environment (RANK, WORLD_SIZE,
  LOCAL_RANK); without it everything runs as a single process and this module
  is a no-op. NCCL on GPU, gloo on CPU.
- Data parallelism never changes the maths: every rank reads the same global
  micro-batch and keeps its own slice of rows, so the sum of rank gradients
  is the single-process gradient of the same global batch (the loop scales the
  loss so that DDP's mean over ranks gives exactly that).
- DistributedDataParallel by default; FSDP (`fully_shard`, one unit per
  transformer block plus the root) behind a flag for models whose weights and
  optimizer state do not fit one device. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0  # global rank of this process
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this machine (picks the GPU)
    fsdp: bool = False  # shard parameters and optimizer state (FSDP2) instead of replicating (DDP)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str, fsdp: bool = False) -> tuple[DistributedContext, str]:
    """Join the process group when launched by torchrun; returns (context, device for this rank)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistributedContext(fsdp=False), device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistributedContext(rank, world_size, local_rank, fsdp), device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, context: DistributedContext, device: str) -> nn.Module:
    """DDP or FSDP wrapper for training; the model itself when single-process."""
    if not context.enabled:
        return model
    if context.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "layers", []):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextmanager
def gradient_sync(wrapped: nn.Module, context: DistributedContext, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if not context.enabled or sync:
        with nullcontext():
            yield
        return
    if context.fsdp:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
        return
    with wrapped.no_sync():
        yield


def all_reduce_sum(values: list[float], context: DistributedContext, device: str) -> list[float]:
    """Sum a few Python floats over all ranks (logging, stop flags)."""
    if not context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()
