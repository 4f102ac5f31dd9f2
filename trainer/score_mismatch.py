"""Score Mismatching (docs/METHODS.md §2): a one-step generator G(z) = Dn_G(g_sigma z; g_sigma) trained against a
score network D that predicts eps at the 10 SMM levels, through an EDM denoiser (eps = (x - Dn_D(x; sigma_t)) /
sigma_t, so auxiliary weights are a ready-made eps predictor). Three engine Updates per iteration
(stages/distill.py): D on real and generated samples, lazy R1 on D every r1_every iterations, and G through a
frozen D. Every term is a mean over batch and pixels, R1 divided by the same B·P, so L_real : L_fake : R1 keep the
official code's ratios (tests/test_distill.py checks it). As in the official code, and unlike StyleGAN2, the lazy R1
step is not multiplied by its interval.
"""
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from shards.errors import ModelError
from shards.manifest import image_shape
from trainer.edm import Denoiser
from trainer.export import GENERATOR_FILES, build_denoiser, read_model, write_model
from trainer.unet import build_unet

SMM_LEVELS = 10


def smm_sigmas(levels: int = SMM_LEVELS, beta_min: float = 1e-4, beta_max: float = 0.02) -> torch.Tensor:
    """The SMM noise levels, float32 [levels]: sigma_t = sqrt(1 - abar_t), abar = cumprod(1 - beta)."""
    beta = torch.linspace(beta_min, beta_max, levels, dtype=torch.float64)
    return (1 - torch.cumprod(1 - beta, 0)).sqrt().float()


def lazy_adam_scaling(r1_every: int) -> float:
    """StyleGAN2's c = r / (r + 1): D's learning rate times c and its betas to the power c, because R1
    steps come every r1_every iterations on top of the ordinary ones."""
    return r1_every / (r1_every + 1) if r1_every > 0 else 1.0


class OneStepGenerator(nn.Module):
    """x = G(z) = Dn(sigma_max * z; sigma_max), z ~ N(0, I) of the image shape: one network call."""

    def __init__(self, denoiser: Denoiser, sigma_max: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_max = float(sigma_max)
        # sigma as a tensor that moves with the module: a Python float would be copied to the GPU, blocking,
        # at every call (twice an iteration); not persistent, so the saved weights stay as they were
        self.register_buffer("sigma", torch.tensor(self.sigma_max), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.denoiser(z * self.sigma_max, self.sigma)


class ScoreNet(nn.Module):
    """eps(x, t) = (x - Dn(x; sigma_t)) / sigma_t for integer levels t [B]; float32 output."""

    def __init__(self, denoiser: Denoiser, sigmas: torch.Tensor | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.register_buffer("sigmas", smm_sigmas() if sigmas is None else sigmas.float())

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t].reshape(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t)
        return (x.float() - self.denoiser(x, sigma)) / sigma


def _levels(score_net) -> torch.Tensor:
    return getattr(score_net, "module", score_net).sigmas  # the score net may be a DDP wrapper


def d_noise(real: torch.Tensor, levels: int):
    """The draws of one D step, from the global RNG: levels and added noise for the real and the fake
    half, and the fake half's target eps', drawn independently of the noise that was added to it."""
    batch = real.shape[0]
    t_real = torch.randint(levels, (batch,), device=real.device)
    t_fake = torch.randint(levels, (batch,), device=real.device)
    eps_real, eps_fake, eps_target = (torch.randn(real.shape, device=real.device) for _ in range(3))
    return t_real, t_fake, eps_real, eps_fake, eps_target


def d_step_loss(D, G, real, noise=d_noise) -> torch.Tensor:
    """The score network's loss of one step, L_real + L_fake, noise from the global RNG (seeded per rank,
    checkpointed). G runs under no_grad. Real and fake halves go through D in one batched call (one forward
    per step, which DDP handles like any other; the UNet treats samples independently)."""
    sigmas = _levels(D)
    with torch.no_grad():
        fake = G(torch.randn(real.shape, device=real.device)).float()
    real = real.float()
    t_real, t_fake, eps_real, eps_fake, eps_target = noise(real, len(sigmas))
    shape = (-1,) + (1,) * (real.dim() - 1)
    x_in = torch.cat([real + sigmas[t_real].reshape(shape) * eps_real, fake + sigmas[t_fake].reshape(shape) * eps_fake])
    out = D(x_in, torch.cat([t_real, t_fake]))
    batch = real.shape[0]
    return (out[:batch] - eps_real).square().mean() + (out[batch:] - eps_target).square().mean()


def r1_step_loss(D, real, gamma: float, global_batch: int, grad_scale: float = 1.0) -> torch.Tensor:
    """(gamma / 2) * mean(|grad_{x_t} sum D(x_t, t)|^2) / global_batch on real x_t (the module docstring says
    why this is the official weight), differentiable in D's parameters.

    The input gradient is taken of the output sum times `grad_scale` and divided back (the loss scale under
    fp16, where the unscaled input gradient would underflow; PyTorch's recipe for gradient penalties). The
    double backward runs on the math attention kernel: the fused ones have no double backward."""
    sigmas = _levels(D)
    t = torch.randint(len(sigmas), (real.shape[0],), device=real.device)
    x_t = (real.float() + sigmas[t].reshape((-1,) + (1,) * (real.dim() - 1)) * torch.randn_like(real.float()))
    x_t = x_t.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        out = D(x_t, t)
        (grad,) = torch.autograd.grad(out.sum() * grad_scale, x_t, create_graph=True)
    grad = grad / grad_scale
    # + 0 x the output: parameters the input gradient does not depend on (the output bias) still take part
    # in the backward pass, which DDP requires of every step (StyleGAN2-ADA does the same).
    return gamma / 2 * grad.square().mean() / global_batch + 0 * out.sum()


def g_step_loss(D, G, batch: int, shape, device) -> torch.Tensor:
    """L_G on `batch` fresh z; D must be frozen (the engine does it)."""
    fake = G(torch.randn((batch, *shape), device=device))
    t = torch.randint(len(_levels(D)), (batch,), device=device)
    eps = torch.randn_like(fake)
    sigma = _levels(D)[t].reshape((-1,) + (1,) * (fake.dim() - 1))
    return (D(fake + sigma * eps, t) - eps).square().mean()


def build_networks(spec, network_preset: str, dropout, shape, edm, warm_state: dict | None
                   ) -> tuple[OneStepGenerator, ScoreNet]:
    """G and D as the distill spec says; warm_state is the teacher-side Denoiser state dict (init=warm and/or
    score_init=aux)."""
    channels, size = shape[0], shape[-1]

    def denoiser(preset, state):
        try:
            net = build_unet(preset, size, channels, dropout)
        except ValueError as e:
            raise ModelError(f"distill: preset {preset} does not fit {channels}x{size}x{size} images: {e}") from None
        d = Denoiser(net, sigma_data=edm.sigma_data)
        if state is not None:
            d.load_state_dict(state)
        return d

    g_preset, d_preset = spec.g_preset or network_preset, spec.d_preset or network_preset
    G = OneStepGenerator(denoiser(g_preset, warm_state if spec.init == "warm" else None), spec.g_sigma or edm.sigma_max)
    D = ScoreNet(denoiser(d_preset, warm_state if spec.score_init == "aux" else None))
    return G, D


def check_shapes(G: nn.Module, D: nn.Module, shape, device="cpu") -> None:
    """A clear error when G's or D's output does not have the data's image shape."""
    shape = tuple(shape)
    with torch.no_grad():
        z = torch.zeros((2, *shape), device=device)
        try:
            x = G(z)
        except Exception as e:  # a UNet at the wrong resolution or channel count fails inside
            raise ModelError(f"distill: the generator cannot take {shape} inputs: {type(e).__name__}: {e}") from None
        if tuple(x.shape) != (2, *shape):
            raise ModelError(f"distill: the generator makes images of shape {tuple(x.shape[1:])}, "
                             f"the data has {shape}")
        try:
            e = D(x, torch.zeros(2, dtype=torch.long, device=device))
        except Exception as err:
            raise ModelError(f"distill: the score network cannot take {shape} inputs: "
                             f"{type(err).__name__}: {err}") from None
        if tuple(e.shape) != (2, *shape):
            raise ModelError(f"distill: the score network outputs shape {tuple(e.shape[1:])} for "
                             f"{shape} images")


def export_generator(directory: Path, G: OneStepGenerator, meta: dict) -> None:
    write_model(directory, G, meta, *GENERATOR_FILES)


def load_generator(directory: Path) -> tuple[OneStepGenerator, dict]:
    """The EMA one-step generator of a finished distill stage (eval mode, no grad) and its meta."""
    state, meta = read_model(directory, *GENERATOR_FILES, "generator", "run `scorefuse distill` first")
    G = OneStepGenerator(build_denoiser(meta), meta["sigma_max"])
    G.load_state_dict(state)
    G.image_shape = image_shape(meta)
    return G.eval().requires_grad_(False), meta
