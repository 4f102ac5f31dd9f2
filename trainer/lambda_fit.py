"""The lambda fit: ScoreFusion's weights from one pass of Gram statistics, then an exact simplex QP.

The fused model's denoising loss is a quadratic in lambda, lambda^T A lambda - 2 b^T lambda + c (docs/METHODS.md
§1), for either Objective (edm: the training law and weighting, averaged over pixels; paper: ScoreFusion's VE SDE
loss, summed over pixels). accumulate_gram computes A, b, c per sigma bin in one forward pass of every auxiliary
per (image, sigma, noise) draw, in float64 sums that ranks all-reduce; fit_barycenter_weights solves the QP on the
simplex exactly by enumerating supports. The paper's own fit (SoftmaxWeights, trained by SGD through the engine
in stages/fuse.py) is kept as a baseline.
"""
import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
from torch import nn

from shards.errors import ModelError
from trainer.edm import loss_weight, sample_sigma
from trainer.fused_denoiser import FusedDenoiser
from trainer.precision import forward_precision
from shards.seeds import normal

MAX_EXACT_K = 12  # 2^12 - 1 supports, each a (|S| + 1)-dimensional linear solve: well under a second
PAPER_T_MIN, PAPER_SIGMA_BASE = 1e-5, 25.0  # ScoreFusion's VE SDE: t ~ U(1e-5, 1), sigma = 25^t "marginal std"


@dataclass(frozen=True)
class Objective:
    """What lambda minimises: the law of sigma, the weight w(sigma), and whether the squared error is a mean
    over the P pixels of an image (EDM's training loss) or their sum (the paper's). fuse.objective picks it."""
    name: str
    sample: Callable[[int, torch.Generator | None, torch.device], torch.Tensor]  # (batch, generator, device) -> sigma
    weight: Callable[[torch.Tensor], torch.Tensor]
    per_pixel_mean: bool

    def within(self, sigma_range: tuple[float, float] | None) -> "Objective":
        """The same objective with its sigma draws moved into `sigma_range` (to its nearest end), the sigmas a
        fused model is valid at; itself for None (every sigma)."""
        if sigma_range is None:
            return self
        low, high = sigma_range
        return replace(self, sample=lambda batch, g, device: self.sample(batch, g, device).clamp(low, high))

    def pixel_norm(self, pixels: int) -> int:
        """What the summed squared error of an image is divided by."""
        return pixels if self.per_pixel_mean else 1


def edm_objective(p_mean: float, p_std: float, sigma_data: float) -> Objective:
    return Objective("edm", lambda batch, g, device: sample_sigma(batch, g, p_mean, p_std, device=device),
                     lambda sigma: loss_weight(sigma, sigma_data), per_pixel_mean=True)


def paper_sigma(t: torch.Tensor) -> torch.Tensor:
    """ScoreFusion's VE SDE: sigma(t) = sqrt((25^(2t) - 1) / (2 ln 25))."""
    return ((PAPER_SIGMA_BASE ** (2 * t) - 1) / (2 * math.log(PAPER_SIGMA_BASE))).sqrt()


def paper_objective() -> Objective:
    def sample(batch, g, device):
        u = torch.rand(batch, generator=g, device=g.device) if g is not None else torch.rand(batch, device=device)
        return paper_sigma(PAPER_T_MIN + (1 - PAPER_T_MIN) * u.to(device))
    return Objective("paper", sample, lambda sigma: 1 / sigma ** 2, per_pixel_mean=False)


def objective_of(name: str, p_mean: float, p_std: float, sigma_data: float) -> Objective:
    return edm_objective(p_mean, p_std, sigma_data) if name == "edm" else paper_objective()


@dataclass
class GramStats:
    """Means over draws of the loss's quadratic form, per sigma bin (float64).

    A [bins, K, K], b [bins, K], c [bins]; n [bins] the number of draws in each bin (a bin without
    draws has A, b, c = 0); sigma_edges None (one bin) or the bins - 1 edges (bin j covers
    [edges[j-1], edges[j])).
    """
    A: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    n: torch.Tensor
    sigma_edges: torch.Tensor | None = None

    def bin_losses(self, lam: torch.Tensor) -> torch.Tensor:
        """Each bin's mean loss, [bins], for lam [K] (every bin) or [bins, K]."""
        lam = torch.as_tensor(lam, dtype=torch.float64).expand_as(self.b)
        quadratic = torch.einsum("bk,bkl,bl->b", lam, self.A, lam)
        return quadratic - 2 * (self.b * lam).sum(dim=1) + self.c

    def loss(self, lam: torch.Tensor) -> torch.Tensor:
        """The mean loss over all draws (bins weighted by their draw counts), a 0-dim tensor."""
        return (self.bin_losses(lam) * self.n).sum() / self.n.sum()

    def pooled(self) -> "GramStats":
        """The same draws as one bin: the statistics of a single lambda for every sigma."""
        share = self.n / self.n.sum()
        return GramStats((share[:, None, None] * self.A).sum(0, keepdim=True),
                         (share[:, None] * self.b).sum(0, keepdim=True),
                         (share * self.c).sum(0, keepdim=True), self.n.sum(0, keepdim=True))


@torch.no_grad()
def accumulate_gram(fused: FusedDenoiser, batches: Iterable, draws_per_image: int, objective: Objective,
                    sigma_edges=None, generator: torch.Generator | None = None,
                    autocast_dtype: torch.dtype | None = None,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GramStats:
    """One pass over the target images: GramStats of `fused`'s auxiliaries (its weights play no part).

    batches: x0 tensors [B, C, H, W] in [-1, 1], or (x0, generator) pairs whose generator draws that
        batch's noise; seeding it from the batch's global index makes the statistics independent of
        how batches are split over ranks. Plain tensors draw from `generator` (None: torch's global RNG).
    For each batch, `draws_per_image` times: sigma (the objective's law) then noise are drawn (for the edm
    objective exactly as trainer.edm.denoising_loss draws them), the K outputs
    are computed (under torch.autocast(autocast_dtype) when given, else in float32 without TF32; D_i's output
    stays float32 either way), and the
    products are summed in float64.
    sigma_edges: bins for a piecewise-constant lambda (None: one bin); independent of fused's own bins.
    reduce: sums a tensor over ranks, e.g. `lambda t: accelerator.reduce(t, "sum")`; None for one process.
    Every rank raises the same ModelError after the reduction, so none is left waiting in a collective.
    The per-bin sums are a one-hot matrix product, not index_add_ (non-deterministic on CUDA).
    """
    if draws_per_image < 1:
        raise ValueError(f"draws_per_image must be at least 1, got {draws_per_image}")
    edges = None if sigma_edges is None else torch.as_tensor(sigma_edges, dtype=torch.float64).reshape(-1)
    num_bins, k = 1 if edges is None else edges.numel() + 1, fused.num_models
    device = fused.weights.device
    edges = None if edges is None else edges.to(device)
    sums = torch.zeros(num_bins, k * k + k + 2, dtype=torch.float64, device=device)  # A, b, c, n per bin
    for item in batches:
        x0, batch_generator = item if isinstance(item, (tuple, list)) else (item, generator)
        x0 = x0.to(device=device, dtype=torch.float32)
        batch, pixels = x0.shape[0], math.prod(x0.shape[1:])
        target = x0.flatten(1).to(torch.float64)
        for _ in range(draws_per_image):
            sigma = objective.sample(batch, batch_generator, device)
            noise = normal(x0.shape, batch_generator, device)
            sigma = sigma.reshape(batch, 1, 1, 1)
            with forward_precision(device.type, autocast_dtype):
                outputs = fused.all_outputs(x0 + sigma * noise, sigma)
            outputs = outputs.flatten(2).to(torch.float64)  # [K, B, P]
            weight = objective.weight(sigma.flatten().to(torch.float64)) / objective.pixel_norm(pixels)
            per_draw = torch.cat([
                torch.einsum("kbp,lbp->bkl", outputs, outputs).flatten(1),
                torch.einsum("kbp,bp->bk", outputs, target),
                target.square().sum(dim=1, keepdim=True)], dim=1) * weight[:, None]
            per_draw = torch.cat([per_draw, torch.ones(batch, 1, dtype=torch.float64, device=device)], dim=1)
            bins = (torch.zeros(batch, dtype=torch.long, device=device) if edges is None
                    else torch.bucketize(sigma.flatten().to(torch.float64), edges, right=True))
            sums += torch.nn.functional.one_hot(bins, num_bins).to(torch.float64).T @ per_draw
    if reduce is not None:
        sums = reduce(sums)
    counts = sums[:, -1]
    if counts.sum() == 0:
        raise ModelError("no target images: the Gram pass saw no draws (empty target set or shard)")
    means = sums / counts.clamp(min=1)[:, None]  # an empty bin stays all zero
    A = means[:, :k * k].reshape(num_bins, k, k)
    b = means[:, k * k:k * k + k]
    diagonal = A.diagonal(dim1=1, dim2=2)
    bad = [fused.names[i] for i in range(k)
           if not (torch.isfinite(diagonal[:, i]).all() and torch.isfinite(b[:, i]).all())]
    if bad:
        raise ModelError(f"non-finite denoiser outputs from {', '.join(bad)} on the target data")
    if not torch.isfinite(means[:, -2]).all():
        raise ModelError("the target images are not finite")
    return GramStats(A.cpu(), b.cpu(), means[:, -2].cpu(), counts.cpu(), None if edges is None else edges.cpu())


def _objective(A: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return lam @ A @ lam - 2 * b @ lam


def _affine_optimum(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A stationary point of lam^T A lam - 2 b^T lam subject to sum(lam) = 1 (KKT system; least
    squares, i.e. the minimum-norm solution, where A is singular)."""
    k = A.shape[0]
    kkt = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    kkt[:k, :k], kkt[:k, k], kkt[k, :k] = A, 1, 1
    rhs = torch.cat([b, torch.ones(1, dtype=torch.float64)])
    return (torch.linalg.pinv(kkt, hermitian=True) @ rhs)[:k]


def unconstrained_optimum(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The minimiser under the sum-to-one constraint only (weights may be negative), [K]: the best
    affine combination of the auxiliaries, which shows how much the sign constraint costs."""
    return _affine_optimum(torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


def solve_simplex_qp(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """argmin lam^T A lam - 2 b^T lam over the probability simplex, float64 [K].

    For K <= MAX_EXACT_K, exactly: the optimum is a stationary point of the problem restricted to the
    affine hull of its support face, so the best of those stationary points that is feasible
    (lam_S >= 0) over every non-empty support S is the global optimum (for PSD A, as Gram matrices
    are). Larger K fall back to projected gradient descent (convex, so it converges to the same point).
    """
    A = torch.as_tensor(A, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    k = A.shape[0]
    if k > MAX_EXACT_K:
        return projected_gradient_qp(A, b)
    scale = float(A.abs().max()) + float(b.abs().max()) + 1e-300
    best, best_value = None, None
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            index = torch.tensor(support)
            lam_s = _affine_optimum(A[index][:, index], b[index])
            if (lam_s < -1e-10).any():
                continue
            lam = torch.zeros(k, dtype=torch.float64)
            lam[index] = lam_s.clamp(min=0)
            lam = lam / lam.sum()
            value = float(_objective(A, b, lam))
            # smaller supports come first and win ties, so an optimum at a vertex is returned as e_j
            if best_value is None or value < best_value - 1e-14 * scale:
                best, best_value = lam, value
    return best


def projected_gradient_qp(A: torch.Tensor, b: torch.Tensor, max_steps: int = 100_000,
                          tolerance: float = 1e-13) -> torch.Tensor:
    """The simplex QP by accelerated projected gradient (FISTA, step 1 / Lipschitz constant), for K
    too large to enumerate supports. Stops when lam is a fixed point of one projected gradient step
    to within `tolerance`, which (unlike a small move of the iterate) certifies optimality."""
    A = torch.as_tensor(A, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    k = A.shape[0]
    step = 1 / max(2 * float(torch.linalg.eigvalsh(A).max()), 1e-300)

    def gradient_step(point):
        return project_to_simplex(point - step * 2 * (A @ point - b))

    lam = momentum_point = torch.full((k,), 1 / k, dtype=torch.float64)
    t = 1.0
    for _ in range(max_steps):
        previous = lam
        lam = gradient_step(momentum_point)
        if float((gradient_step(lam) - lam).abs().max()) < tolerance:
            break
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum_point = lam + (t - 1) / t_next * (lam - previous)
        t = t_next
    return lam


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the probability simplex (sort-based, Held et al. / Duchi et al.)."""
    u, _ = torch.sort(v, descending=True)
    cumulative = u.cumsum(0) - 1
    ranks = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int((u - cumulative / ranks > 0).nonzero().max())
    return (v - cumulative[rho] / (rho + 1)).clamp(min=0)


def vertex_losses(stats: GramStats) -> torch.Tensor:
    """Each auxiliary alone (lambda = e_j): loss per bin, [bins, K]."""
    return stats.A.diagonal(dim1=1, dim2=2) - 2 * stats.b + stats.c[:, None]


def fit_barycenter_weights(stats: GramStats, names: list[str] | None = None) -> dict:
    """The exact simplex QP per sigma bin, with the numbers to judge it by.

    Returns {"lambda": float64 tensor [bins, K], "report": json-able dict}. The report has, per bin
    and over all draws: the fitted loss, each auxiliary's own loss (vertex), and the sum-to-one
    optimum without the sign constraint and its loss; with several bins also the single-lambda fit on
    the same draws. A bin without draws does not identify lambda; it gets the single-lambda fit.
    """
    k = stats.A.shape[-1]
    names = names or [f"auxiliary {i}" for i in range(k)]
    pooled = stats.pooled()
    pooled_lam = solve_simplex_qp(pooled.A[0], pooled.b[0])
    lam, free, bins = [], [], []
    vertex = vertex_losses(stats)
    for j in range(stats.A.shape[0]):
        if stats.n[j] == 0:
            lam.append(pooled_lam)
            free.append(unconstrained_optimum(pooled.A[0], pooled.b[0]))
        else:
            lam.append(solve_simplex_qp(stats.A[j], stats.b[j]))
            free.append(unconstrained_optimum(stats.A[j], stats.b[j]))
    lam, free = torch.stack(lam), torch.stack(free)
    fitted, free_losses = stats.bin_losses(lam), stats.bin_losses(free)
    for j in range(stats.A.shape[0]):
        bins.append({"draws": int(stats.n[j]), "lambda": lam[j].tolist(), "loss": float(fitted[j]),
                     "vertex_losses": dict(zip(names, vertex[j].tolist())),
                     "unconstrained_lambda": free[j].tolist(), "unconstrained_loss": float(free_losses[j])})
    share = stats.n / stats.n.sum()
    report = {"names": list(names), "loss": float(stats.loss(lam)),
              "vertex_losses": dict(zip(names, (share[:, None] * vertex).sum(0).tolist())),
              "unconstrained_loss": float(stats.loss(free)),
              "sigma_edges": None if stats.sigma_edges is None else stats.sigma_edges.tolist(), "bins": bins}
    if stats.A.shape[0] > 1:
        report["single_lambda"] = {"lambda": pooled_lam.tolist(), "loss": float(pooled.loss(pooled_lam))}
    return {"lambda": lam, "report": report}


class SoftmaxWeights(nn.Module):
    """The paper's parameterisation lambda = softmax(logits), one logit vector per sigma bin, the logits drawn
    from N(0, 1) as the paper's code does (from `generator`; zero logits, a uniform lambda, without one).
    forward(sigma [B]) -> lambda of each sample, [B, K]."""

    def __init__(self, num_models: int, sigma_edges=None, generator: torch.Generator | None = None):
        super().__init__()
        edges = None if sigma_edges is None else torch.as_tensor(sigma_edges, dtype=torch.float64).reshape(-1)
        num_bins = 1 if edges is None else edges.numel() + 1
        logits = torch.zeros(num_bins, num_models) if generator is None else \
            torch.randn(num_bins, num_models, generator=generator)
        self.logits = nn.Parameter(logits)
        self.register_buffer("sigma_edges", edges)

    def weights(self) -> torch.Tensor:
        """lambda per bin, [bins, K]: what FusedDenoiser takes."""
        return self.logits.softmax(dim=1)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1).to(torch.float64)
        bins = (torch.zeros_like(sigma, dtype=torch.long) if self.sigma_edges is None
                else torch.bucketize(sigma, self.sigma_edges, right=True))
        return self.weights()[bins]
