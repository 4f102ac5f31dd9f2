"""Pretrained discrete-time diffusion models (DDPM's epsilon- or v-prediction networks, as diffusers stores them)
as EDM denoisers D(x; sigma), so that they fuse, sample and score like the models trained here.

DDPM noises x0 as x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at its timesteps t = 0 .. T-1. Divided by
sqrt(abar_t) that is EDM's x = x0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t), so at any sigma the
network sees x_t = c_in x, c_in = 1 / sqrt(sigma^2 + 1), at the timestep t(sigma) of its own table, and

    epsilon-prediction:  D(x; sigma) = x - sigma eps(c_in x, t(sigma))
    v-prediction:        D(x; sigma) = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v(c_in x, t(sigma))

(docs/METHODS.md §4 derives the second). Both are EDM's preconditioning with sigma_data = 1 (the variance a
VP model's inputs are scaled to): c_out = -sigma and F = eps, or c_out = -sigma c_in and F = v. No x0 clipping:
D is the network's estimate, whatever range it falls in, as the fused and likelihood computations need.

t(sigma) interpolates the table linearly in ln sigma (diffusers' EulerDiscreteScheduler._sigma_to_t, k-diffusion's
DiscreteSchedule.sigma_to_t); `timesteps="round"` takes the table's nearest entry in ln sigma instead, for a
network that never saw a timestep between two integers. Outside [sigma_min, sigma_max] of the table, t is the
table's end: the model declares that range (`sigma_range`), and the stages use the intersection of the fused
models' ranges.
"""
import inspect
import math

import torch
from torch import nn

from shards.errors import ModelError
from trainer.edm import _as_batch_sigma

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers' beta_schedule names
PREDICTIONS = ("epsilon", "v_prediction")
TIMESTEPS = ("interpolate", "round")


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """abar_t of a diffusers scheduler config, float64 [T], as diffusers' own DDPMScheduler computes it (every
    discrete DDPM-family scheduler shares its beta schedules); ModelError for a schedule or prediction type the
    wrapper does not handle."""
    from diffusers import DDPMScheduler
    schedule = scheduler_config.get("beta_schedule")
    if schedule not in SCHEDULES:
        raise ModelError(f"beta_schedule {schedule!r} of {scheduler_config.get('_class_name', 'the scheduler')} is "
                         f"not handled (handled: {', '.join(SCHEDULES)})")
    if scheduler_config.get("trained_betas") is not None or scheduler_config.get("rescale_betas_zero_snr"):
        # zero terminal SNR puts sigma_max at infinity; trained betas are a table of their own
        raise ModelError("trained_betas and rescale_betas_zero_snr schedules are not handled")
    prediction = scheduler_config.get("prediction_type", "epsilon")  # older configs predate the key: epsilon
    if prediction not in PREDICTIONS:
        raise ModelError(f"prediction_type {prediction!r} is not handled (handled: {', '.join(PREDICTIONS)})")
    # DDPMScheduler's own keys only: another scheduler's (PNDM's skip_prk_steps, ...) would be warned about
    known = inspect.signature(DDPMScheduler.__init__).parameters
    config = {k: v for k, v in scheduler_config.items() if k in known}
    return DDPMScheduler.from_config(config).alphas_cumprod.to(torch.float64)


class DiscreteTimeDenoiser(nn.Module):
    """D(x; sigma) of a network `net` trained in DDPM's parametrisation, with the call signature of
    trainer.edm.Denoiser. `net(x_t, t, return_dict=False)[0]` is the network's eps or v (a diffusers
    UNet2DModel, or anything called like one) at float timesteps t [B].

    alphas_cumprod: its table abar_t [T]; prediction: epsilon | v_prediction; timesteps: interpolate | round.
    As in trainer.edm.Denoiser, the coefficients and the combination are float32 whatever the autocast; only
    the network runs in the autocast dtype."""

    sigma_data = 1.0  # the preconditioning's: a VP model's inputs have unit variance

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, prediction: str = "epsilon",
                 timesteps: str = "interpolate", image_shape: tuple | None = None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ModelError(f"prediction_type {prediction!r} is not handled (handled: {', '.join(PREDICTIONS)})")
        if timesteps not in TIMESTEPS:
            raise ValueError(f"timesteps must be one of {TIMESTEPS}, got {timesteps!r}")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        log_sigmas = ((1 - abar) / abar).log() / 2
        if len(abar) < 2 or not torch.isfinite(log_sigmas).all() or not (log_sigmas.diff() > 0).all():
            raise ModelError("the noise schedule must give finite sigmas increasing with the timestep")
        self.net = net
        self.prediction = prediction
        self.timesteps = timesteps
        # A plain tuple, not a buffer: state_dict() stays the network's own, .to(dtype) and the fused model's
        # autocast copy cannot round it, and two wrappers of one architecture with different tables count as
        # different networks (trainer.fused_denoiser.architecture_difference compares such settings).
        self.log_sigma_table = tuple(log_sigmas.tolist())
        if image_shape is not None:
            self.image_shape = tuple(image_shape)

    @property
    def log_sigmas(self) -> torch.Tensor:
        """ln sigma_t of the table, float64 [T] on the CPU."""
        return torch.tensor(self.log_sigma_table, dtype=torch.float64)

    @property
    def sigma_range(self) -> tuple[float, float]:
        """The sigmas the network was trained at: its table's first and last."""
        return math.exp(self.log_sigma_table[0]), math.exp(self.log_sigma_table[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(sigma), float64 [N], for sigma [N] (any float dtype): in ln sigma, linear between the table's
        neighbours (clamped to its ends), or its nearest entry."""
        log_sigmas = torch.tensor(self.log_sigma_table, dtype=torch.float64, device=sigma.device)
        log_sigma = sigma.to(torch.float64).clamp(min=1e-10).log()
        distances = log_sigma[None] - log_sigmas[:, None]  # [T, N]
        if self.timesteps == "round":
            return distances.abs().argmin(dim=0).to(torch.float64)
        low = distances.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = _as_batch_sigma(sigma, x.shape[0], x.device)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        t = self.timestep(sigma.flatten()).to(torch.float32)
        raw = self.net(c_in * x, t, return_dict=False)[0].to(torch.float32)
        if self.prediction == "epsilon":
            return x - sigma * raw
        return c_in ** 2 * x - sigma * c_in * raw


def from_diffusers(unet: nn.Module, scheduler_config: dict, timesteps: str = "interpolate") -> DiscreteTimeDenoiser:
    """The denoiser of a diffusers UNet2DModel and its scheduler's config, in eval mode without gradients;
    ModelError for what the wrapper does not handle (a class-conditional network, a learned variance, a
    schedule or prediction type of another kind)."""
    config = unet.config
    if getattr(config, "num_class_embeds", None) or getattr(config, "class_embed_type", None):
        raise ModelError("a class-conditional UNet needs class labels; only unconditional models are handled")
    if config.out_channels != config.in_channels:
        raise ModelError(f"the UNet returns {config.out_channels} channels for {config.in_channels} (a learned "
                         "variance?); only eps or v of the image's shape is handled")
    abar = alphas_cumprod(scheduler_config)
    shape = (config.in_channels, config.sample_size, config.sample_size) if isinstance(config.sample_size, int) \
        else (config.in_channels, *config.sample_size)
    denoiser = DiscreteTimeDenoiser(unet, abar, scheduler_config.get("prediction_type", "epsilon"), timesteps, shape)
    return denoiser.eval().requires_grad_(False)
