"""Exponential moving average of weights with a half-life counted in images, as in EDM.

A half-life in kimg means the same averaging window for any batch size or number of processes.
Early in training the half-life is capped at `rampup_ratio` x images seen, so the average is not
dominated by the random initial weights.
"""
import copy

import torch
from torch import nn


def ema_beta(batch_images: int, nimg: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, nimg * rampup_ratio)
    return 0.5 ** (batch_images / max(halflife_nimg, 1e-8))


def make_ema(module: nn.Module) -> nn.Module:
    """A frozen fp32 copy that follows `module`."""
    return copy.deepcopy(module).float().eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema: nn.Module, module: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), module.parameters()):
        p_ema.copy_(p.detach().float().lerp(p_ema, beta))
    for b_ema, b in zip(ema.buffers(), module.buffers()):
        b_ema.copy_(b)
