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
    """A frozen fp32 copy that follows `module`, with the module's own forward: Accelerate's prepare replaces
    the instance's forward by an autocast one under mixed precision, and a deep copy would inherit it, so the
    EMA would sample at the training precision in one place and at another in the next."""
    ema = copy.deepcopy(module)
    for patched in ("forward", "_original_forward"):
        ema.__dict__.pop(patched, None)
    return ema.float().eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema: nn.Module, module: nn.Module, beta: float) -> None:
    """ema <- beta ema + (1 - beta) module: one fused op over all parameters (a loop would launch one kernel
    per tensor, over 400 for DDPM++), then the buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach().float() for p in module.parameters()], 1 - beta)
    for b_ema, b in zip(ema.buffers(), module.buffers()):
        b_ema.copy_(b)
