"""What every loss shares: shape checks and float32 upcasting of autocast outputs."""

from __future__ import annotations

import torch


def check_pair(p: torch.Tensor, z: torch.Tensor) -> None:
    if p.ndim != 2 or z.ndim != 2 or p.shape[1] != z.shape[1]:
        raise ValueError(f"expected p (N, D) and z (M, D) with the same D, got {tuple(p.shape)} and {tuple(z.shape)}")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision (autocast outputs) -> float32; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
