"""Mixture fusion (trainer/mixture.py, trainer/router.py) where the answer is known: Gaussian populations
p_i = N(mu_i, s^2 I), whose noised densities N(mu_i, (s^2 + sigma^2) I) and denoisers are closed forms."""
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from stages.rundir import engine_paths
from trainer.engine import Engine, Update, adam
from trainer.gaussian import GaussianDenoiser
from trainer.fused_denoiser import FusedDenoiser
from trainer.mixture import HybridDenoiser, MixtureDenoiser, em_mixture_weights
from trainer.router import Router, calibration, log_density_ratios, router_loss
from trainer.spec import TrainSpec

SHAPE = (1, 4, 4)
S = 0.3
PI = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)


def means() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(SHAPE, generator=g) * 1.6 - 0.8 for _ in range(3)]


class CountingDenoiser(GaussianDenoiser):
    """The exact denoiser of N(mu, S^2 I) (trainer/gaussian.py), counting its calls."""

    def __init__(self, mu):
        super().__init__(mu, S)
        self.calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        return super().forward(x, sigma)


class GaussianRouter(nn.Module):
    """log N(x; mu_i, (S^2 + sigma^2) I) for each population: the exact posterior's logits."""

    def __init__(self, mus):
        super().__init__()
        self.register_buffer("mus", torch.stack(mus))

    def forward(self, x, sigma):
        variance = (S ** 2 + sigma.reshape(-1, 1) ** 2)
        squared = (x.flatten(1)[:, None] - self.mus.flatten(1)[None]).square().sum(-1)
        return -squared / (2 * variance) - 0.5 * x[0].numel() * variance.log()


def mixture_log_density(x, sigma, mus, pi):
    """log sum_i pi_i N(x; mu_i, (S^2 + sigma^2) I), differentiable in x."""
    variance = S ** 2 + sigma ** 2
    d = x[0].numel()
    squared = (x.flatten(1)[:, None] - torch.stack(mus).flatten(1).double()[None]).square().sum(-1)
    log_n = -squared / (2 * variance) - 0.5 * d * math.log(2 * math.pi * variance)
    return torch.logsumexp(log_n + pi.log(), dim=1)


@pytest.mark.parametrize("sigma", [0.05, 0.4, 3.0])
def test_the_mixture_denoiser_is_the_exact_posterior_mean(sigma):
    """With the analytic posterior as the router, sum_i w_i D_i equals Tweedie's formula on the mixture density,
    x + sigma^2 grad log p(x; sigma), computed independently by autograd."""
    mus = means()
    model = MixtureDenoiser([CountingDenoiser(mu) for mu in mus], GaussianRouter(mus), PI)
    x = (torch.stack(mus)[torch.tensor([0, 1, 2, 0, 1])] + (S ** 2 + sigma ** 2) ** 0.5 *
         torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))).double().requires_grad_(True)
    (score,) = torch.autograd.grad(mixture_log_density(x, sigma, mus, PI).sum(), x)
    tweedie = x.detach() + sigma ** 2 * score
    with torch.no_grad():
        got = model(x.detach().float(), torch.full((5,), sigma))
    torch.testing.assert_close(got.double(), tweedie, rtol=0, atol=2e-5)


def test_pi_one_hot_gives_model_j_bit_for_bit_and_runs_only_it():
    mus = means()
    x, sigma = torch.randn(4, *SHAPE), torch.tensor([0.01, 0.3, 2.0, 40.0])
    for j in range(3):
        denoisers = [CountingDenoiser(mu) for mu in mus]
        model = MixtureDenoiser(denoisers, GaussianRouter(mus), torch.eye(3)[j])
        with torch.no_grad():
            assert torch.equal(model(x, sigma), denoisers[j](x, sigma))
        assert [d.calls for d in denoisers] == [0 if i != j else 2 for i in range(3)]


def test_skipping_a_network_the_posterior_excludes_changes_almost_nothing():
    mus = means()
    denoisers = [CountingDenoiser(mu) for mu in mus]
    exact = MixtureDenoiser(denoisers, GaussianRouter(mus), PI)
    skipping = MixtureDenoiser(denoisers, GaussianRouter(mus), PI, skip=1e-6)
    x = mus[0].expand(8, *SHAPE) + 0.01 * torch.randn(8, *SHAPE)  # near population 0, small sigma: sure
    with torch.no_grad():
        for d in denoisers:
            d.calls = 0
        skipped = skipping(x, torch.full((8,), 0.01))
        assert [d.calls for d in denoisers] == [1, 0, 0]
        torch.testing.assert_close(skipped, exact(x, torch.full((8,), 0.01)), rtol=0, atol=1e-6)


class CountingRouter(GaussianRouter):
    calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        return super().forward(x, sigma)


def test_the_hybrid_is_the_mixture_at_and_above_sigma_star_and_the_barycenter_below():
    """Per sample, in one call that mixes both sides; a call wholly below sigma_star does not run the router.
    lambda is zero for network 2 and pi is not: the hybrid runs it where the mixture's weights use it."""
    mus = means()
    lam = torch.tensor([0.7, 0.3, 0.0])
    denoisers = [CountingDenoiser(mu) for mu in mus]
    router = CountingRouter(mus)
    hybrid = HybridDenoiser(denoisers, router, PI, lam, sigma_star=0.5)
    mixture, barycenter = MixtureDenoiser(denoisers, GaussianRouter(mus), PI), FusedDenoiser(denoisers, lam)
    x, sigma = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2)), torch.tensor([0.01, 0.3, 0.5, 40.0])
    with torch.no_grad():
        got = hybrid(x, sigma)
        torch.testing.assert_close(got[:2], barycenter(x[:2], sigma[:2]), rtol=0, atol=1e-6)
        torch.testing.assert_close(got[2:], mixture(x[2:], sigma[2:]), rtol=0, atol=1e-6)
        assert router.calls == 1
        for d in denoisers:
            d.calls = 0
        below = hybrid(x, torch.full((4,), 0.3))
        assert router.calls == 1 and [d.calls for d in denoisers] == [1, 1, 0]  # lambda's networks alone
        assert torch.equal(below, barycenter(x, torch.full((4,), 0.3)))


def gaussian_mixture_samples(mus, pi, count, seed):
    g = torch.Generator().manual_seed(seed)
    which = torch.multinomial(pi.float(), count, replacement=True, generator=g)
    return torch.stack(mus)[which] + S * torch.randn(count, *SHAPE, generator=g), which


def test_em_recovers_pi_from_exact_likelihoods():
    mus = means()
    x, _ = gaussian_mixture_samples(mus, PI, 4000, seed=2)
    log_p = GaussianRouter(mus)(x, torch.zeros(len(x)))  # log N(x; mu_i, S^2 I) + a shared constant
    pi, log_likelihood = em_mixture_weights(log_p)
    torch.testing.assert_close(pi, PI, atol=0.03, rtol=0)
    assert log_likelihood >= em_mixture_weights(log_p, steps=1)[1]  # EM never lowers the likelihood


def test_a_router_trained_on_three_gaussian_populations_recovers_pi(tmp_path):
    """The router sees the three populations in equal shares, sigma log-uniform over the sampler's range; EM on
    its density ratios at sigma = 0.05 over target samples of the mixture PI recovers PI within 0.05 (4000
    images; measured error about 0.02)."""
    mus = means()

    def batches(start):
        g = torch.Generator().manual_seed(start)
        labels = torch.arange(3).repeat_interleave(32)
        while True:
            yield torch.stack(mus)[labels] + S * torch.randn(96, *SHAPE, generator=g), labels
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    router = Router(4, 1, 3, "tiny")
    spec = TrainSpec(batch=96, lr=2e-3, lr_rampup_kimg=0, total_kimg=96 * 400 / 1000, log_every_kimg=10,
                     checkpoint_every_kimg=0)
    engine = Engine(Accelerator(cpu=True), spec, engine_paths(tmp_path), modules={"router": router},
                    optimizers={"adam": adam(router.parameters(), 2e-3, (0.9, 0.999), 1e-8)},
                    updates=[Update("adam", "router", lambda m, b, s: router_loss(m["router"], b[0], b[1], 0.002, 80.0))],
                    batches=batches, log=lambda m: None)
    engine.run()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    target, _ = gaussian_mixture_samples(mus, PI, 4000, seed=3)
    log_r = log_density_ratios(router.eval(), target, 0.05, 4, torch.Generator().manual_seed(0))
    pi, _ = em_mixture_weights(log_r)
    torch.testing.assert_close(pi, PI, atol=0.05, rtol=0)


class Overconfident(GaussianRouter):
    """The exact posterior's logits times 4: the same guesses, overstated."""

    def forward(self, x, sigma):
        return 4 * super().forward(x, sigma)


def test_the_calibration_check_passes_the_exact_posterior_and_catches_an_overconfident_one():
    """The exact posterior (equal shares) is calibrated at every noise level: the expected calibration error is
    sampling noise only, its cross-entropy falls to chance ln 3 at the top band and its accuracy is near 1 at the
    bottom one. The same guesses with logits x 4 have the same accuracy and a large error where the populations
    overlap."""
    mus = means()
    g = torch.Generator().manual_seed(5)

    def batches():
        for _ in range(16):
            labels = torch.arange(3).repeat_interleave(128)
            yield torch.stack(mus)[labels] + S * torch.randn(384, *SHAPE, generator=g), labels
    exact = calibration(GaussianRouter(mus), batches(), 0.002, 80.0, bands=4, seed=0)
    assert sum(row["images"] for row in exact) == 16 * 384
    assert all(row["ece"] < 0.04 for row in exact), exact
    assert exact[0]["accuracy"] > 0.95 and exact[-1]["cross_entropy"] == pytest.approx(math.log(3), abs=0.02)
    loud = calibration(Overconfident(mus), batches(), 0.002, 80.0, bands=4, seed=0)
    assert [row["accuracy"] for row in loud] == pytest.approx([row["accuracy"] for row in exact], abs=0.03)
    assert max(row["ece"] for row in loud) > 0.15, loud
