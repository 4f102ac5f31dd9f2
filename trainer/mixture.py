"""Mixture fusion (docs/METHODS.md §1b): the second fusion rule, for a target that is a mixture of the auxiliary
populations, p = sum_i pi_i p_i, which the barycenter (a product of experts) cannot express in general.

The noised target is the same mixture of the noised p_i, so its denoiser is exactly

    D(x; sigma) = sum_i w_i(x, sigma) D_i(x; sigma),   w_i = pi_i p_i(x; sigma) / sum_j pi_j p_j(x; sigma).

The posteriors come from a router: a noise-conditional classifier trained to tell which auxiliary population a
noised image came from, with class priors rho_i, outputs q_i = rho_i p_i / sum_j rho_j p_j, so
w_i is proportional to pi_i q_i / rho_i. The weights pi are fitted on the n target images by EM on density
ratios r_i = q_i / rho_i at a small sigma (or, as a check, on each auxiliary's own likelihood of the images):

    pi_i <- mean_x [pi_i r_i(x) / sum_j pi_j r_j(x)].
"""
import math
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from shards.errors import ModelError
from trainer.fused_denoiser import FusedDenoiser, check_weights

EM_TOLERANCE = 1e-10


def em_mixture_weights(log_ratios: torch.Tensor, steps: int = 10_000) -> tuple[torch.Tensor, float]:
    """Maximum-likelihood mixture weights by EM from per-image log density ratios (or log-likelihoods)
    log r_i(x) [N, K], any constant per image allowed: (pi [K] float64 on the CPU, mean over images of
    log sum_i pi_i r_i(x)). EM runs on the device of log_ratios; pi comes back on the CPU whatever that device,
    so that callers mix it freely with CPU values (fuse's fit_mixture: with the per-image log-likelihoods of
    evaluation.likelihood, which are on the CPU, and into json).
    Starts uniform; each step cannot lower the log-likelihood; stops when pi moves less than EM_TOLERANCE."""
    log_r = torch.as_tensor(log_ratios, dtype=torch.float64)
    if log_r.dim() != 2 or len(log_r) == 0:
        raise ModelError(f"EM needs per-image log ratios [N, K], got shape {tuple(log_r.shape)}")
    pi = torch.full((log_r.shape[1],), 1 / log_r.shape[1], dtype=torch.float64, device=log_r.device)
    for _ in range(steps):
        responsibilities = torch.softmax(log_r + pi.log(), dim=1)
        new = responsibilities.mean(dim=0)
        done = (new - pi).abs().max() < EM_TOLERANCE
        pi = new
        if done:
            break
    return pi.cpu(), float(torch.logsumexp(log_r + pi.clamp(min=1e-300).log(), dim=1).mean())


class MixtureDenoiser(nn.Module):
    """D(x; sigma) = sum_i w_i(x, sigma) D_i(x; sigma) with w_i proportional to pi_i exp(router logit_i) / rho_i,
    with the call signature of trainer.edm.Denoiser.

    router: (x, sigma) -> logits [B, K], log p_i(x; sigma) up to a constant per sample, trained with class
        priors `priors` (rho; uniform when the router saw the populations equally often).
    skip: networks whose weight is below it for every sample of a call are not run, and the others' weights
        renormalised (the cost then approaches one network where the posterior is sure, small sigma); 0 runs
        every network whose weight is not exactly 0 (all K, unless a posterior underflows). With pi = e_j every other weight is exactly 0, so only network j runs and the output is
        D_j's bit for bit.
    The auxiliaries are held by a FusedDenoiser (its batched vmapped path and error messages); its own lambda
    plays no part.
    """

    def __init__(self, denoisers: Sequence[nn.Module], router: nn.Module, pi, priors=None,
                 names: Sequence[str] | None = None, batched: bool | None = None, skip: float = 0.0):
        super().__init__()
        k = len(denoisers)
        self.networks = FusedDenoiser(denoisers, torch.full((k,), 1 / k), names=names, batched=batched)
        self.router = router.eval().requires_grad_(False)
        self.register_buffer("pi", check_weights(pi, k)[0])
        priors = torch.full((k,), 1 / k) if priors is None else priors
        self.register_buffer("log_prior_ratio", self.pi.clamp(min=1e-300).log()
                             - check_weights(priors, k)[0].log())
        self.register_buffer("active", self.pi > 0)
        self.skip = skip
        self.names = self.networks.names
        self.sigma_data = self.networks.sigma_data
        for shared in ("image_shape", "sigma_range"):
            if hasattr(self.networks, shared):
                setattr(self, shared, getattr(self.networks, shared))

    @property
    def num_models(self) -> int:
        return self.networks.num_models

    @property
    def networks_per_call(self) -> int:
        """At most; fewer run where the router is sure (skip) or pi is 0."""
        return int(self.active.sum())

    def train(self, mode: bool = True):
        super().train(mode)
        self.router.eval()
        return self

    def weights(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """w [B, K], float64: the posterior of each population for each sample."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        logits = self.router(x.to(torch.float32), sigma).to(torch.float64)
        logits = torch.where(self.pi > 0, logits + self.log_prior_ratio, -math.inf)
        return torch.softmax(logits, dim=1)

    def weighted_networks(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, list[Callable]]:
        """D(x; sigma) as sum_k weights[:, k] D_k(x) over the networks that forward runs (skip, pi > 0):
        (weights float64 [B, n], renormalised over them as forward does, each network as x -> D_k(x; sigma)
        float32), so that a caller can run them one at a time. The weights are the router's, a function of x
        with its autograd graph: d/dx of sum_k w_k D_k has the term sum_k D_k (grad w_k)^T too."""
        w, indices = self._running(x, sigma)
        return w, [partial(self.networks.run_one, i, sigma=sigma) for i in indices]

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        w, indices = self._running(x, sigma)
        if len(indices) == 1:
            return self.networks.run_one(indices[0], x, sigma)
        if len(indices) == self.num_models:
            outputs = self.networks.all_outputs(x, sigma)
        else:
            outputs = torch.stack([self.networks.run_one(i, x, sigma) for i in indices])
        return (w.to(outputs.dtype).T[:, :, None, None, None] * outputs).sum(dim=0)

    def _running(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, list[int]]:
        """The networks that run (pi > 0, and with skip a weight above it for some sample), and their weights
        renormalised over them, float64 [B, n]."""
        w = self.weights(x, sigma)
        run = ((w >= self.skip) if self.skip > 0 else (w != 0)).any(dim=0) & self.active
        indices = run.nonzero().flatten().tolist()
        w = w[:, indices]
        return w / w.sum(dim=1, keepdim=True), indices


class HybridDenoiser(MixtureDenoiser):
    """The hybrid rule, an ablation of the two (docs/METHODS.md §1b): over the same K networks, the mixture's
    weights w(x, sigma) where sigma >= sigma_star and the barycenter's lambda(sigma) below it. At large sigma the
    noised populations overlap and the sampler decides which population an image becomes, in the proportions pi
    that a barycenter cannot express; at small sigma the population is settled, and lambda's average of the
    networks denoises the details. sigma_star = 0 is the mixture, sigma_star = inf the barycenter.

    lam, sigma_edges: the barycenter's weights, as trainer.fused_denoiser.FusedDenoiser takes them. A batch
    wholly below sigma_star does not run the router."""

    def __init__(self, denoisers: Sequence[nn.Module], router: nn.Module, pi, lam, sigma_star: float,
                 priors=None, sigma_edges=None, names: Sequence[str] | None = None, batched: bool | None = None,
                 skip: float = 0.0):
        super().__init__(denoisers, router, pi, priors, names, batched, skip)
        self.networks = FusedDenoiser(denoisers, lam, sigma_edges=sigma_edges, names=names, batched=batched)
        self.active = self.active | (self.networks.weights != 0).any(dim=0)
        self.sigma_star = float(sigma_star)

    def weights(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        lam = self.networks.weights_for(sigma, x.shape[0]).to(x.device)
        below = sigma < self.sigma_star
        if below.all():
            return lam
        return torch.where(below[:, None], lam, super().weights(x, sigma))
