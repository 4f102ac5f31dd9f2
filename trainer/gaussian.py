"""Gaussian data N(mu, Sigma) as a model whose every answer is known in closed form: its exact EDM denoiser and
the exact log-likelihood its probability-flow ODE assigns (docs/METHODS.md §1, §1c). It is the oracle that the
fusion math, the mixture, the samplers and the PF-ODE likelihood are checked and benchmarked against (tests/,
bench/likelihood.py); no stage trains or loads it.

In the eigenbasis of Sigma (eigenvalues lambda_k) the denoiser shrinks each coordinate of x - mu by
lambda_k / (lambda_k + sigma^2); the ODE moves y along each eigenvector as
x(sigma) - mu = sqrt((lambda_k + sigma^2) / (lambda_k + sigma_min^2)) (y - mu), and the divergence integrates to
sum_k 1/2 ln((lambda_k + sigma_max^2) / (lambda_k + sigma_min^2)).
"""
import math

import torch
from torch import nn


class GaussianDenoiser(nn.Module):
    """The exact denoiser D(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu) of N(mu, Sigma), with
    trainer.edm.Denoiser's call signature and attributes (sigma_data, image_shape).

    Sigma = std^2 I (`std`, a float: the shrink is one number per image) or a full covariance matrix
    (`covariance`, [D, D] for D = mu.numel()). It computes in `dtype` (float32, as a network would; None: in the
    input's dtype)."""

    def __init__(self, mu: torch.Tensor, std: float | None = None, covariance: torch.Tensor | None = None,
                 sigma_data: float = 0.5, dtype: torch.dtype | None = torch.float32):
        super().__init__()
        if (std is None) == (covariance is None):
            raise ValueError("give exactly one of std (an isotropic Gaussian) and covariance")
        self.std, self.dtype = std, dtype
        self.sigma_data = sigma_data
        self.image_shape = tuple(mu.shape)
        self.register_buffer("mu", mu.to(dtype or mu.dtype))
        if covariance is not None:
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance.to(torch.float64))
            self.register_buffer("eigenvalues", eigenvalues)
            self.register_buffer("eigenvectors", eigenvectors.to(dtype or torch.float64))
        # the distribution itself, in float64 on the CPU, for sample() and log_likelihood()
        self.mean64 = mu.detach().to("cpu", torch.float64)
        self.covariance = covariance.detach().to("cpu", torch.float64) if covariance is not None else \
            torch.eye(mu.numel(), dtype=torch.float64) * std ** 2

    def forward(self, x, sigma):
        x = x.to(self.dtype) if self.dtype else x
        if self.std is not None:
            sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.dim() - 1))
            return self.mu + self.std ** 2 / (self.std ** 2 + sigma ** 2) * (x - self.mu)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        shrink = (self.eigenvalues / (self.eigenvalues + sigma ** 2)).to(x.dtype)
        mu, eigenvectors = self.mu.flatten().to(x.dtype), self.eigenvectors.to(x.dtype)
        coordinates = (x.flatten(1) - mu) @ eigenvectors
        return (mu + (shrink * coordinates) @ eigenvectors.T).reshape(x.shape)

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`count` draws of N(mu, Sigma), float64 [count, *image_shape]."""
        normal = torch.randn(count, self.mean64.numel(), generator=generator, dtype=torch.float64)
        return self.mean64 + (normal @ torch.linalg.cholesky(self.covariance).T).reshape(count, *self.image_shape)

    def log_likelihood(self, y: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
        """The exact log-likelihood the probability-flow ODE from sigma_min to sigma_max assigns to images y
        (evaluation/likelihood.py's log_likelihood without its discretisation and probes): log N(x(sigma_max);
        0, sigma_max^2 I) + the divergence integral, float64 [B]."""
        eigenvalues, eigenvectors = torch.linalg.eigh(self.covariance)
        mu = self.mean64.flatten()
        stretch = ((eigenvalues + sigma_max ** 2) / (eigenvalues + sigma_min ** 2)).sqrt()
        x_max = mu + (stretch * ((y.to(torch.float64).flatten(1) - mu) @ eigenvectors)) @ eigenvectors.T
        dim = mu.numel()
        log_prior = -0.5 * x_max.square().sum(dim=1) / sigma_max ** 2 \
            - 0.5 * dim * math.log(2 * math.pi * sigma_max ** 2)
        return log_prior + stretch.log().sum()


def rotated_gaussian(shape, std_min: float, std_max: float, seed: int = 0, mean_range: float = 0.3) -> GaussianDenoiser:
    """N(mu, Q diag(std^2) Q^T): mu uniform in [-mean_range, mean_range]^D, standard deviations spread
    log-uniformly from std_min to std_max along the axes of a random rotation Q. Sigma is not diagonal, so a
    Rademacher probe of the Jacobian's trace is not exact by accident."""
    generator = torch.Generator().manual_seed(seed)
    dim = math.prod(shape)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    std = torch.logspace(math.log10(std_min), math.log10(std_max), dim, dtype=torch.float64)
    mu = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 * mean_range - mean_range
    return GaussianDenoiser(mu, covariance=rotation @ torch.diag(std ** 2) @ rotation.T)
