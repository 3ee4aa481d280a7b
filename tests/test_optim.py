"""Schedules from a table, LARS against a loop written from the formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reid_ssl.optim import LARS, build_optimizer, cosine_schedule, parameter_groups, warmup_cosine_lr


@pytest.mark.parametrize(
    "step,expected",
    [(0, 0.99), (500, 0.995), (1000, 1.0), (250, 1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2), (2000, 1.0)],
)
def test_ema_momentum_schedule(step, expected):
    assert cosine_schedule(step, 1000, 0.99, 1.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    "step,expected",
    [(0, 4.8e-4), (5, 4.8e-4 + (4.8 - 4.8e-4) / 2), (10, 4.8), (55, 2.4), (100, 0.0)],
)
def test_warmup_cosine_lr(step, expected):
    assert warmup_cosine_lr(step, 100, 4.8, 10, 1e-4) == pytest.approx(expected, abs=1e-9)


def test_bn_and_bias_are_excluded_from_decay():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    decay, no_decay = parameter_groups([net], 1e-4)
    assert len(decay["params"]) == 2 and decay["weight_decay"] == 1e-4
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0 and not no_decay["lars"]


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(torch.randn(5))
    opt = LARS(
        [{"params": [w], "weight_decay": 0.1, "lars": True}, {"params": [b], "weight_decay": 0.0, "lars": False}],
        lr=0.5,
        momentum=0.9,
        eta=0.01,
    )
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(5, 3), torch.randn(5)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    local = 0.01 * w0.norm() / (gw.norm() + 0.1 * w0.norm())
    assert torch.allclose(w, w0 - 0.5 * local * (gw + 0.1 * w0), atol=1e-6)
    assert torch.allclose(b, b0 - 0.5 * gb, atol=1e-6)  # no adaptation, no decay
    # second step: momentum buffer v = 0.9 v + lr * local * g
    v_b = 0.5 * gb
    b.grad = gb.clone()
    opt.step()
    assert torch.allclose(b, b0 - v_b - (0.9 * v_b + 0.5 * gb), atol=1e-6)


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_every_optimizer_reduces_a_quadratic(name):
    torch.manual_seed(0)
    net = nn.Linear(10, 1)
    opt = build_optimizer(name, [net], lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.5)
    x = torch.randn(64, 10)
    y = x @ torch.randn(10, 1)
    first = ((net(x) - y) ** 2).mean().item()
    for _ in range(50):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_unknown_optimizer():
    with pytest.raises(KeyError, match="lars"):
        build_optimizer("adam", [nn.Linear(2, 2)], 0.1, 0.9, 0.0)
