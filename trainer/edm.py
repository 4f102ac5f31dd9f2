"""EDM (Karras et al. 2022) preconditioning, training loss and deterministic Heun sampler.

Notation as in docs/METHODS.md: x = x0 + sigma * n, D(x; sigma) estimates x0, sigma_data (sd) is
the data standard deviation the preconditioning assumes. The raw network F only ever sees
unit-variance inputs and targets:

    D(x; sigma) = c_skip * x + c_out * F(c_in * x, c_noise)
    c_skip = sd^2 / (sigma^2 + sd^2),   c_out = sigma * sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),     c_noise = ln(sigma) / 4.

With F = 0, D is c_skip * x, which is exactly the optimal denoiser for data N(0, sd^2 I); the loss
weight 1 / c_out^2 makes that model's expected loss 1 at every sigma (see tests/test_edm.py).
"""
from typing import Callable

import torch
from torch import nn

from shards.seeds import normal

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_batch_sigma(sigma, batch: int, device: torch.device) -> torch.Tensor:
    """sigma as a float32 [B, 1, 1, 1] tensor; accepts a number, [B], [B, 1, 1, 1] or one value."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1)
    return sigma.expand(batch, 1, 1, 1)


class Denoiser(nn.Module):
    """EDM-preconditioned denoiser D(x; sigma) around a raw network F(x_in, c_noise).

    The coefficients and the combination c_skip * x + c_out * F are computed in float32 and the
    result is float32 even under autocast: at small sigma, D is almost exactly x (c_skip -> 1) and
    the network's correction is tiny, so rounding x to bf16 would destroy the signal that the
    sampler and the ScoreFusion Gram statistics depend on. Only F itself runs in the autocast dtype.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = _as_batch_sigma(sigma, x.shape[0], x.device)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        raw = self.net(c_in * x, c_noise)
        return c_skip * x + c_out * raw.to(torch.float32)


def common_sigma_range(denoisers) -> tuple[float, float] | None:
    """The sigmas at which every one of `denoisers` is valid: the intersection of the ranges they declare
    (`sigma_range`, as a pretrained discrete-time model does; one without is valid at every sigma), None when
    none declares one. ValueError when the ranges do not overlap."""
    ranges = [tuple(d.sigma_range) for d in denoisers if getattr(d, "sigma_range", None) is not None]
    if not ranges:
        return None
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if not low < high:
        raise ValueError(f"the denoisers' sigma ranges {ranges} have no sigma in common")
    return low, high


def sigma_bounds(denoiser, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a sampler or likelihood ODE of `denoiser`, within the range it declares."""
    valid = getattr(denoiser, "sigma_range", None)
    if valid is None:
        return sigma_min, sigma_max
    return max(sigma_min, valid[0]), min(sigma_max, valid[1])


def sample_sigma(batch: int, generator: torch.Generator | None, p_mean: float = -1.2, p_std: float = 1.2,
                 device: torch.device | None = None) -> torch.Tensor:
    """Training noise levels on `device`, shape [batch]: ln(sigma) ~ N(p_mean, p_std^2) (EDM's log-normal,
    whose defaults put most weight on the mid-range sigmas where the loss can still be reduced). Drawn from
    `generator` on its own device (shards.seeds.normal), or from the global RNG when it is None."""
    return (normal((batch,), generator, device) * p_std + p_mean).exp()


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 = 1 / c_out^2, which makes the
    effective target of F unit-variance at every noise level."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def denoising_loss(denoiser: nn.Module, x0: torch.Tensor, generator: torch.Generator,
                   p_mean: float = -1.2, p_std: float = 1.2,
                   sigma_data: float | None = None) -> torch.Tensor:
    """Per-sample EDM loss, shape [B]: lambda(sigma) * mean over pixels of (D(x0 + sigma n; sigma) - x0)^2.

    Mean over pixels (EDM sums): the loss is then about 1 at initialisation for every resolution and
    channel count, so logged losses and gradient-clipping thresholds compare across datasets; with
    Adam a constant loss scale does not change the updates, so EDM's learning rates carry over. The
    caller reduces over the batch.

    sigma and n are drawn from `generator` (on its own device, then moved to x0's) in that order, so
    the noise of a step is a pure function of the generator state; dropout inside the network still
    draws from torch's global RNG.

    `denoiser` is a Denoiser or a wrapper of one (DDP, FSDP) called in its place so that the
    wrapper's hooks run; `sigma_data` defaults to denoiser.sigma_data and must be given when the
    wrapper hides that attribute.
    """
    sigma_data = denoiser.sigma_data if sigma_data is None else sigma_data
    batch = x0.shape[0]
    sigma = sample_sigma(batch, generator, p_mean, p_std, device=x0.device)
    noise = normal(x0.shape, generator, x0.device)
    sigma = sigma.reshape(batch, 1, 1, 1)
    x0 = x0.to(torch.float32)
    denoised = denoiser(x0 + sigma * noise, sigma)
    squared_error = (denoised - x0).square().flatten(1).mean(dim=1)
    return loss_weight(sigma.flatten(), sigma_data) * squared_error


def sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0) -> torch.Tensor:
    """EDM's sampling noise levels, float64, length num_steps + 1: sigma_max ... sigma_min then 0.

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho; rho = 7
    spends the steps where the ODE curves most (small sigma)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2 (got {num_steps}): the schedule needs both "
                         "sigma_max and sigma_min")
    fraction = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    inv_rho = 1 / rho
    sigmas = (sigma_max ** inv_rho + fraction * (sigma_min ** inv_rho - sigma_max ** inv_rho)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(denoiser: DenoiserFn, latents: torch.Tensor, num_steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Deterministic EDM sampler (Algorithm 1, no churn): integrate the probability-flow ODE
    dx/dsigma = (x - D(x; sigma)) / sigma from x = latents * sigma_max down to sigma = 0 with Heun's
    2nd-order method, and a plain Euler step on the last interval (its end, sigma = 0, is where
    the ODE's slope is undefined). 2 * num_steps - 1 denoiser evaluations.

    `denoiser` is any callable (x, sigma) -> x0 estimate, e.g. a Denoiser or a fused combination of
    several; it is called with x in float64 and sigma as a float64 [B, 1, 1, 1] tensor, so that it
    broadcasts against x. As in EDM the ODE state is kept in float64: it costs nothing next to the
    network and removes state rounding as a source of difference when samplers or fused models are
    compared. Returns the samples in latents' dtype.
    """
    steps = sigma_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    batch = latents.shape[0]

    def slope(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma_batch = sigma.reshape(1, 1, 1, 1).expand(batch, 1, 1, 1)
        return (x - denoiser(x, sigma_batch).to(torch.float64)) / sigma

    x = latents.to(torch.float64) * steps[0]
    for index in range(num_steps):
        sigma_cur, sigma_next = steps[index], steps[index + 1]
        d_cur = slope(x, sigma_cur)
        x_next = x + (sigma_next - sigma_cur) * d_cur
        if index < num_steps - 1:
            d_next = slope(x_next, sigma_next)
            x_next = x + (sigma_next - sigma_cur) * (d_cur + d_next) / 2
        x = x_next
    return x.to(latents.dtype)
