"""Projector and predictor MLPs of the online/target pair."""

from __future__ import annotations

from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, init: str) -> nn.Sequential:
    """Linear(bias) -> BN -> ReLU -> Linear(bias): (N, in_dim) -> (N, out_dim).

    The reference code's "NonLinearNeckSimCLR" layout. ``init="kaiming"`` (fan-in) is the projector's init,
    ``init="normal"`` (std 0.01, bias 0) the predictor's; BN weight 1, bias 0.
    """
    head = nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
    for m in head.modules():
        if isinstance(m, nn.Linear):
            if init == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return head
