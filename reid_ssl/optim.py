"""Optimizers and schedules. Schedules are pure functions of the optimizer step.

- [0] Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of Convolutional Networks" (LARS), 2017,
  https://arxiv.org/abs/1708.03888
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import overload

import torch
from torch import nn

from reid_ssl.registry import Registry


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """``start`` at step 0, ``end`` at ``max_steps``, cosine in between (clamped outside).

    The EMA momentum of docs/method.md, "The EMA target" is ``cosine_schedule(t, T, 0.99, 1.0)``:
    ``1 - (1 - m0) * (cos(pi t / T) + 1) / 2``.
    """
    if max_steps <= 0:
        return end
    t = min(max(step, 0), max_steps) / max_steps
    return end - (end - start) * (math.cos(math.pi * t) + 1.0) / 2.0


def warmup_cosine_lr(
    step: int, max_steps: int, base_lr: float, warmup_steps: int, warmup_start_factor: float = 1e-4
) -> float:
    """Linear warm-up from ``base_lr * warmup_start_factor`` to ``base_lr``, then cosine to 0.

    Source: docs/method.md, "Optimisation in the paper's configuration".
    """
    if warmup_steps > 0 and step < warmup_steps:
        start = base_lr * warmup_start_factor
        return start + (base_lr - start) * step / warmup_steps
    return cosine_schedule(step - warmup_steps, max(max_steps - warmup_steps, 1), base_lr, 0.0)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as in the reference code.

    Source: docs/method.md, "Optimisation in the paper's configuration".

    For a parameter group with ``lars=True``: ``local_lr = eta * ||w|| / (||g|| + wd * ||w||)`` (1 when a norm
    is zero), ``v <- momentum * v + lr * local_lr * (g + wd * w)``, ``w <- w - v``. Groups with ``lars=False``
    (BN parameters and biases) get neither weight decay nor adaptation: ``local_lr = 1``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"bad LARS hyperparameters lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "lars": True}
        )

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, momentum, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    local_lr = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        eta * w_norm / (g_norm + wd * w_norm),
                        torch.ones_like(w_norm),
                    )
                    g = (g + wd * p) * local_lr
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(momentum).add_(g, alpha=lr)
                p.sub_(buf)
        return loss


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: weights (decay + LARS adaptation) and BN parameters / biases (neither).

    Source: docs/method.md, "Optimisation in the paper's configuration".
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


OptimizerFactory = Callable[[list[dict], float, float, float, float], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register(
    "lars", help="LARS (the paper's optimizer): SGD with layer-wise trust ratio; BN and biases excluded"
)
def _lars(groups: list[dict], lr: float, momentum: float, weight_decay: float, trust: float) -> torch.optim.Optimizer:
    return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=trust)


@OPTIMIZERS.register("sgd", help="SGD with momentum; BN parameters and biases without weight decay")
def _sgd(groups: list[dict], lr: float, momentum: float, weight_decay: float, trust: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([{k: v for k, v in g.items() if k != "lars"} for g in groups], lr=lr, momentum=momentum)


@OPTIMIZERS.register("adamw", help="AdamW; BN parameters and biases without weight decay")
def _adamw(groups: list[dict], lr: float, momentum: float, weight_decay: float, trust: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "lars"} for g in groups], lr=lr)


def build_optimizer(
    name: str,
    modules: Iterable[nn.Module],
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """An optimizer from :data:`OPTIMIZERS` over ``modules``; BN parameters and biases are never weight-decayed.

    Raises:
        UnknownNameError: ``name`` is not registered.
    """
    return OPTIMIZERS[name](parameter_groups(modules, weight_decay), lr, momentum, weight_decay, trust_coefficient)
