"""Process-group setup for `torchrun`: gloo on CPU, NCCL on GPU, and a single-process fallback.

Only rank 0 logs, checkpoints and validates; the helpers here keep the other ranks in step with it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend)
        _log.info("rank %d/%d joined the %s process group", rank, world, backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_true(info: DistInfo, flag: bool) -> bool:
    """True only if `flag` holds on every rank (so all ranks take the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=info.device)
    dist.all_reduce(t)
    return bool(t.item() == 0)


def broadcast_flag(info: DistInfo, flag: bool) -> bool:
    """Rank 0's `flag` on every rank (e.g. the early-stopping decision)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def mean_over_ranks(info: DistInfo, total: float, count: int) -> float:
    """sum(total) / sum(count) over all ranks (e.g. the epoch's mean training loss)."""
    if info.enabled:
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=info.device)
        dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / max(count, 1)
