"""Negative log-likelihood in bits/dim by the probability-flow ODE (Song et al. 2021; the derivation, the error
budget and the dequantisation bound: docs/METHODS.md §1c). Pixel k's dequantisation bin is centred on the value
the model was trained on, k/127.5 - 1, and is 2/255 wide, so the bins tile [-1 - 1/255, 1 + 1/255). The ODE dx/dsigma = (x - D(x; sigma)) / sigma is
integrated with Heun's method from sigma_min to sigma_max, the divergence accumulated by Hutchinson-Skilling with
Rademacher probes fixed per image, a fused model's trace taken one network at a time (memory of one network's
graph), in float32 with TF32 off; DEFAULT_STEPS = 64 keeps the discretisation within about 0.01 bits/dim.
"""
import math
from typing import Sequence

import torch

from trainer.edm import DenoiserFn, sigma_steps
from trainer.precision import full_fp32
from shards.seeds import Stream, generator

DEFAULT_STEPS = 64


def _per_image_draws(seed: int, indices: Sequence[int], shape: Sequence[int],
                     probes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantisation noise u float64 [N, *shape] in U[0, 1), then Rademacher probes float32
    [N, probes, *shape], image i from generator(seed, LIKELIHOOD, i) in that order, on the CPU: an image's
    draws do not depend on the batch it is in, and its u and first probes not on how many probes are asked
    for."""
    shape = tuple(shape)
    noise, signs = [], []
    for index in indices:
        draw = generator(seed, Stream.LIKELIHOOD, int(index))
        noise.append(torch.rand(shape, generator=draw, dtype=torch.float64))
        signs.append(torch.randint(0, 2, (probes, *shape), generator=draw).to(torch.float32) * 2 - 1)
    return torch.stack(noise), torch.stack(signs)


# Pixel k's bin has width 2/255 in the networks' units: -log2 P(k) <= E_u[-log p(y)] + D ln(255/2), over ln 2.
LOG_BINS_PER_UNIT = math.log(255 / 2)


def dequantize(images: torch.Tensor, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> float64 y = in_bin(k, u), u ~ U[0, 1) from image i's own generator (the
    same u that nll_bits_per_dim uses for image i with this seed)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"dequantize takes uint8 images, got {images.dtype}")
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} indices for {len(images)} images")
    noise, _ = _per_image_draws(seed, indices, images.shape[1:], probes=0)
    return in_bin(images, noise)


def in_bin(images: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The point at `position` (in [0, 1), broadcast against the images) of each pixel k's bin, float64 on the
    images' device: (k + position - 1/2) / 127.5 - 1. Position 1/2 is the training value k / 127.5 - 1
    (shards.pixels.to_unit), so pixels 0 and 255 sit in the middle of their bins, not on an edge."""
    return (images.to(torch.float64) + position.to(images.device, torch.float64) - 0.5) / 127.5 - 1


def _drift_and_divergence(denoiser: DenoiserFn, x: torch.Tensor, sigma: torch.Tensor,
                          probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x, sigma) float64 [B, C, H, W] and sigma * div f = D_dim - tr dD/dx float64 [B], the trace
    estimated as the mean over probes v [B, P, C, H, W] of v^T (dD/dx) v.

    A fused denoiser is a weighted sum of networks, D = sum_k w_k D_k (its `weighted_networks`; any other
    denoiser is one network of weight 1), and v^T (dD/dx) v = sum_k w_k v^T J_k v + sum_k (v . D_k)(grad w_k . v).
    Each network runs once with its graph, gives one vector-Jacobian product per probe, and its graph is freed
    before the next runs: the memory peak is one network's graph, not K (EDM's DDPM++ saves about 111 MiB per
    image at 32x32). The second term exists where the weights depend on x (the mixture's router): one more
    vector-Jacobian product per probe, through the weights' own graph. autograd.grad asks for the input's
    gradient only: the networks' parameter gradients are neither computed nor stored."""
    batch, dim = x.shape[0], x[0].numel()
    sigma_batch = sigma.reshape(1, 1, 1, 1).expand(batch, 1, 1, 1)
    with torch.enable_grad():  # evaluation code calls under no_grad
        x_in = x.to(torch.float32).requires_grad_(True)
        split = getattr(denoiser, "weighted_networks", None)
        weights, networks = split(x_in, sigma_batch) if split is not None else \
            (torch.ones(batch, 1, dtype=torch.float64, device=x.device), [lambda inputs: denoiser(inputs, sigma_batch)])
        outputs, forms = [], []
        for network in networks:
            output = network(x_in)
            forms.append(_quadratic_forms(output, x_in, probes))
            outputs.append(output.detach().to(torch.float64))
        outputs = torch.stack(outputs, dim=1)  # [B, K, C, H, W]
        quadratic = (weights.detach()[:, :, None] * torch.stack(forms, dim=1)).sum(dim=1)
        if weights.requires_grad:
            quadratic = quadratic + _quadratic_forms_of_weights(weights, outputs, x_in, probes)
    denoised = (weights.detach()[:, :, None, None, None] * outputs).sum(dim=1)
    return (x - denoised) / sigma, dim - quadratic.mean(dim=1)


def _quadratic_forms(output: torch.Tensor, x_in: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """v^T (d output / d x_in) v for each probe, float64 [B, P]; the output's graph is freed after the last."""
    forms = []
    for p in range(probes.shape[1]):
        v = probes[:, p]
        (vjp,) = torch.autograd.grad(output, x_in, v, retain_graph=p < probes.shape[1] - 1)
        forms.append((vjp.to(torch.float64) * v).flatten(1).sum(dim=1))
    return torch.stack(forms, dim=1)


def _quadratic_forms_of_weights(weights: torch.Tensor, outputs: torch.Tensor, x_in: torch.Tensor,
                                probes: torch.Tensor) -> torch.Tensor:
    """sum_k (v . D_k)(grad w_k . v) for each probe, float64 [B, P]: the gradient of sum_k w_k(x) (v . D_k), the
    D_k held fixed, goes through the weights' graph only."""
    forms = []
    for p in range(probes.shape[1]):
        v = probes[:, p]
        along = (outputs * v[:, None].to(torch.float64)).flatten(2).sum(dim=2)  # [B, K]: v . D_k
        (gradient,) = torch.autograd.grad((weights * along).sum(), x_in, retain_graph=p < probes.shape[1] - 1)
        forms.append((gradient.to(torch.float64) * v).flatten(1).sum(dim=1))
    return torch.stack(forms, dim=1)


def log_likelihood(denoiser: DenoiserFn, y: torch.Tensor, probes: torch.Tensor | None,
                   sigma_min: float = 0.002, sigma_max: float = 80.0, steps: int = DEFAULT_STEPS,
                   rho: float = 7.0) -> torch.Tensor:
    """log p(y) in nats, float64 [B], of the model the PF-ODE of `denoiser` defines at sigma_min.

    denoiser: any (x float32 [B, C, H, W], sigma float64 [B, 1, 1, 1]) -> x0 estimate float32 callable in
        eval mode on y's device (a trainer.edm.Denoiser, a FusedDenoiser, a MixtureDenoiser: these two are
        differentiated one network at a time, see _drift_and_divergence). It must treat the images of a
        batch independently: one vector-Jacobian product serves the whole batch.
    y: [B, C, H, W] about [-1, 1] (e.g. from dequantize).
    probes: Rademacher probes [B, P, C, H, W] (e.g. P = 1), or None for the exact trace, one
        vector-Jacobian product per dimension: only for small images (tests).
    steps: Heun intervals from sigma_min up to sigma_max on EDM's rho-schedule (sigma_steps reversed,
        its trailing 0 dropped): 2 * steps denoiser evaluations, each with one VJP per probe.

    The state x takes Heun steps in sigma, as heun_sample does. The divergence takes the trapezoid rule on
    the same points in ln sigma, i.e. Heun for d(log-det)/d ln sigma = sigma div f = D_dim - tr dD/dx:
    above the data's scales div f ~ D_dim / sigma, on which the trapezoid rule in sigma is biased over the
    schedule's wide steps (sigma doubles per step near sigma_min at 32 steps), while in ln sigma the
    integrand is bounded and flat at both ends. On the Gaussian of the tests this cuts the mean error at
    equal steps 3x (0.033 -> 0.010 bits/dim at 64 steps), i.e. halves the steps for 0.01 bits/dim.
    The ODE state and the accumulated divergence are float64, as in heun_sample.
    """
    batch, dim = y.shape[0], y[0].numel()
    if probes is None:
        # The basis vectors sqrt(D) e_j as a probe set: their mean of v^T J v is exactly sum_j J_jj.
        basis = torch.eye(dim, dtype=torch.float32, device=y.device) * math.sqrt(dim)
        probes = basis.reshape(1, dim, *y.shape[1:]).expand(batch, -1, -1, -1, -1)
    sigmas = sigma_steps(steps + 1, sigma_min, sigma_max, rho)[:-1].flip(0).to(y.device)
    x = y.to(torch.float64)
    integral = torch.zeros(batch, dtype=torch.float64, device=y.device)
    for sigma_cur, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        step = sigma_next - sigma_cur
        drift_cur, rate_cur = _drift_and_divergence(denoiser, x, sigma_cur, probes)
        drift_next, rate_next = _drift_and_divergence(denoiser, x + step * drift_cur, sigma_next, probes)
        x = x + step * (drift_cur + drift_next) / 2
        integral = integral + torch.log(sigma_next / sigma_cur) * (rate_cur + rate_next) / 2
    log_prior = -0.5 * x.square().flatten(1).sum(dim=1) / sigma_max ** 2 \
        - 0.5 * dim * math.log(2 * math.pi * sigma_max ** 2)
    return log_prior + integral


def nll_bits_per_dim(denoiser: DenoiserFn, images: torch.Tensor, indices: Sequence[int], seed: int, *,
                     steps: int = DEFAULT_STEPS, probes: int = 1, sigma_min: float = 0.002,
                     sigma_max: float = 80.0, rho: float = 7.0, batch_size: int = 64,
                     device="cpu") -> torch.Tensor:
    """Per-image upper bound on -log2 P(image) / D, float64 [N] on the CPU, for uint8 `images` [N, C, H, W].

    Image i's dequantisation noise and probes come from generator(seed, LIKELIHOOD, indices[i]), so its
    value depends neither on batch_size nor on which process computes it, and two models evaluated with the
    same seed see the same draws (paired differences). probes: Rademacher probes per image (1 as in Song
    et al.: the probe noise is independent across images, so it adds to the between-image variance that
    the standard error over images already counts), or 0 for the exact trace (small images only).
    `denoiser` must live on `device`; see log_likelihood for the rest. Memory: autograd keeps one network's
    graph for batch_size images at a time (eval.nll_batch). TF32 is off inside (trainer.precision.full_fp32):
    PyTorch's default TF32 convolutions on Ampere and newer GPUs would move the result by a few 1e-3 bits/dim.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"nll_bits_per_dim takes uint8 images, got {images.dtype}")
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} indices for {len(images)} images")
    if probes < 0:
        raise ValueError(f"probes must be >= 0 (0: exact trace), got {probes}")
    dim = math.prod(images.shape[1:])
    values = [torch.zeros(0, dtype=torch.float64)]  # so that no images give an empty result
    with full_fp32():
        for start in range(0, len(images), batch_size):
            chunk, chunk_indices = images[start:start + batch_size], indices[start:start + batch_size]
            noise, signs = _per_image_draws(seed, chunk_indices, chunk.shape[1:], probes)
            y = in_bin(chunk, noise).to(device)
            log_p = log_likelihood(denoiser, y, signs.to(device) if probes else None,
                                   sigma_min, sigma_max, steps, rho)
            values.append(((dim * LOG_BINS_PER_UNIT - log_p) / (dim * math.log(2))).cpu())
    return torch.cat(values)
