"""Devices and ``torchrun``: the one place that joins a process group (training and ``index build`` use it).

Launched by ``torchrun`` (``WORLD_SIZE > 1``), a process joins the default group with NCCL on CUDA and gloo
on CPU; otherwise it runs alone. Nothing here is home-made cluster code: rendezvous, ranks and restarts are
``torchrun``'s (static ``--master_addr`` or ``--rdzv-backend c10d``; see the README's "Scaling up").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from reid_ssl.errors import InputError

T = TypeVar("T")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device`` reads it.

    Raises:
        InputError: not a device name, or a CUDA device on a machine that has none (or fewer).
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device {device!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {device!r}: this machine has no usable CUDA device; use cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return dev


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: global rank, number of processes, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_type: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op when alone)."""
        if self.world_size > 1 and dist.is_initialized():
            if self.device_type == "cuda":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()


def launched_world_size() -> int:
    """Processes ``torchrun`` started for this job (1 when not under ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto", timeout: timedelta | None = None) -> tuple[Dist, torch.device]:
    """Join the process group when launched by ``torchrun``; pick this process's device.

    Under ``torchrun`` a CUDA device without an index becomes ``cuda:<LOCAL_RANK>``.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        timeout: collective timeout (default: PyTorch's); long embedding jobs pass hours.
    """
    world = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", **kwargs)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, world, local_rank, dev.type), dev


def shutdown(d: Dist) -> None:
    """Wait for every process, then leave the process group (no-op when alone)."""
    if dist.is_initialized():
        d.barrier()
        dist.destroy_process_group()


def gather_rows(z: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's rows first, then every other rank's (those carry no gradient).

    Args:
        z: (N, D) on every rank.

    Returns:
        (world_size * N, D).
    """
    if d.world_size == 1:
        return z
    parts = [torch.empty_like(z) for _ in range(d.world_size)]
    dist.all_gather(parts, z.detach().contiguous())
    return torch.cat([z] + [p for r, p in enumerate(parts) if r != d.rank])


def all_values(value: T, d: Dist) -> list[T]:
    """``value`` of every process, in rank order (``[value]`` when alone); a collective."""
    if d.world_size == 1 or not dist.is_initialized():
        return [value]
    every: list[Any] = [None] * d.world_size
    dist.all_gather_object(every, value)
    return every
