"""The PF-ODE likelihood checked against a closed form: for Gaussian data N(mu, Sigma) the exact denoiser is
D(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), its ODE moves y along each eigenvector of Sigma as
x(sigma) - mu = sqrt((lambda + sigma^2) / (lambda + sigma_min^2)) (y - mu), and the divergence integrates to
sum_k 1/2 ln((lambda_k + sigma_max^2) / (lambda_k + sigma_min^2)) (docs/METHODS.md §1c). Sigma is not
diagonal, so that Rademacher probes are not exact by accident."""
import math

import pytest
import torch
from torch import nn

from evaluation.likelihood import DEFAULT_STEPS, dequantize, in_bin, log_likelihood, nll_bits_per_dim
from shards.pixels import to_uint8, to_unit
from evaluation.measurements import step_error
from trainer.edm import Denoiser
from trainer.fused_denoiser import FusedDenoiser
from trainer.gaussian import GaussianDenoiser, rotated_gaussian
from trainer.mixture import HybridDenoiser, MixtureDenoiser
from trainer.router import Router
from trainer.unet import build_unet

SHAPE = (1, 3, 3)
DIM = 9
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def gaussian(seed: int = 0) -> GaussianDenoiser:
    """N(mu, Sigma), mu in [-0.3, 0.3]^D, Sigma with standard deviations from 0.01 (about a quantisation bin,
    2/256) to 0.5 (EDM's sigma_data) along rotated axes: its exact denoiser, samples and closed-form likelihood
    (trainer/gaussian.py; bench/likelihood.py measures the same Gaussian)."""
    return rotated_gaussian(SHAPE, 0.01, 0.5, seed)


def gaussian_samples(model: GaussianDenoiser, count: int, seed: int = 1) -> torch.Tensor:
    return model.sample(count, torch.Generator().manual_seed(seed))


def gaussian_images(model: GaussianDenoiser, count: int, seed: int = 1) -> torch.Tensor:
    """uint8 images whose dequantised values are (about) draws of N(mu, Sigma): quantised as training data is."""
    return to_uint8(gaussian_samples(model, count, seed))


def closed_form(model: GaussianDenoiser, y) -> torch.Tensor:
    """log N(x(sigma_max); 0, sigma_max^2 I) + the divergence integral, float64 [B]."""
    return model.log_likelihood(y, SIGMA_MIN, SIGMA_MAX)


def bits(nats: torch.Tensor) -> torch.Tensor:
    return nats / (DIM * math.log(2))


def test_closed_form_is_the_smoothed_gaussian_up_to_the_prior():
    # The closed form is the density of N(mu, Sigma + sigma_min^2 I) but for the prior N(0, sigma_max^2 I),
    # whose error is on average about 1 / (2 sigma_max^2) nats per dimension at most, per image about
    # |mu| / sigma_max (the module docstring).
    model = gaussian()
    y = gaussian_samples(model, 4096)
    smoothed = torch.distributions.MultivariateNormal(model.mean64.flatten(),
                                                      model.covariance + SIGMA_MIN ** 2 * torch.eye(DIM))
    gap = bits(closed_form(model, y) - smoothed.log_prob(y.flatten(1)))
    assert gap.mean().abs() < 1.1e-4 and gap.abs().max() < 0.01, (gap.mean(), gap.abs().max())


def test_exact_trace_matches_the_closed_form_per_image():
    model = gaussian()
    y = gaussian_samples(model, 32)
    with torch.no_grad():
        log_p = log_likelihood(model, y, None, SIGMA_MIN, SIGMA_MAX, steps=256)
    # 256 Heun steps: about 0.002 bits/dim at worst (test_error_is_second_order_in_the_steps)
    torch.testing.assert_close(bits(log_p), bits(closed_form(model, y)), atol=0.005, rtol=0)


def test_rademacher_probes_are_unbiased():
    model = gaussian()
    images = gaussian_images(model, 1024)
    indices = range(len(images))
    estimate = nll_bits_per_dim(model, images, indices, seed=3, steps=128, probes=1, batch_size=512)
    y = dequantize(images, seed=3, indices=indices)
    exact = (DIM * math.log(255 / 2) - closed_form(model, y)) / (DIM * math.log(2))
    difference = estimate - exact  # paired: the same image and dequantisation noise, only the probes differ
    standard_error = difference.std() / math.sqrt(len(difference))
    # 128 steps bias the mean by ~0.003 bits/dim, a fraction of the standard error; a non-diagonal Sigma
    # makes one probe noisy (a diagonal one would make every Rademacher probe exact)
    assert 0.01 < standard_error < 0.1, standard_error
    assert difference.mean().abs() < 3 * standard_error, (difference.mean(), standard_error)


def test_bits_per_dim_of_uint8_images_is_the_closed_form():
    model = gaussian()
    images = gaussian_images(model, 16)
    indices = list(range(100, 116))
    got = nll_bits_per_dim(model, images, indices, seed=7, steps=256, probes=0)
    y = dequantize(images, seed=7, indices=indices)
    # each pixel within half a bin (1/255) of its training value: the nearest grid value is the pixel's
    assert (y - (images.double() / 127.5 - 1)).abs().max() < 1 / 255 and to_uint8(y).equal(images)
    expected = (DIM * math.log(255 / 2) - closed_form(model, y)) / (DIM * math.log(2))
    torch.testing.assert_close(got, expected, atol=0.005, rtol=0)
    # the seed moves the dequantisation noise
    assert not dequantize(images, seed=8, indices=indices).equal(y)


def test_the_bin_of_every_pixel_value_is_centred_on_its_training_value():
    """Pixel k's bin runs from (k - 1/2) / 127.5 - 1 to (k + 1/2) / 127.5 - 1: the training value k / 127.5 - 1 at
    its centre (0 and 255 included, not on an edge), width 2/255, and the bins of k and k + 1 meet."""
    k = torch.arange(256, dtype=torch.uint8)
    low, centre, high = (in_bin(k, torch.tensor(position)) for position in (0.0, 0.5, 1.0))
    torch.testing.assert_close(centre, k.double() / 127.5 - 1, atol=1e-15, rtol=0)
    torch.testing.assert_close(centre.float(), to_unit(k), atol=1e-7, rtol=0)  # what training feeds the networks
    torch.testing.assert_close(high - low, torch.full((256,), 2 / 255, dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(centre - low, high - centre, atol=1e-15, rtol=0)
    assert high[:-1].equal(low[1:])
    torch.testing.assert_close(torch.stack([low[0], high[-1]]), torch.tensor([-1 - 1 / 255, 1 + 1 / 255],
                                                                              dtype=torch.float64), atol=1e-15, rtol=0)


def test_a_model_as_sharp_as_the_data_costs_a_quarter_bit_per_pixel():
    """A Gaussian of standard deviation s about each pixel's training value (0 and 255 among them) with s^2 +
    sigma_min^2 = h^2 / 3, h = 1/255 the bin's half-width: in expectation over the dequantisation noise, the
    bound is 1/2 + ln(sqrt(2 pi / 3) / 2) nats = 0.2546 bits per dimension (docs/METHODS.md §1c), exactly
    where the bins are centred; with the training value on a bin's edge it would be 1.5 nats more. The
    closed form of each dequantised image, averaged over 2000 draws of u (standard error about 0.004)."""
    h = 1 / 255
    images = torch.tensor([0, 255, 0, 17, 128, 255, 3, 250, 0], dtype=torch.uint8).reshape(1, *SHAPE)
    std = math.sqrt(h ** 2 / 3 - SIGMA_MIN ** 2)
    model = GaussianDenoiser(to_unit(images[0]).double(), std=std, dtype=torch.float64)
    draws = 2000
    y = dequantize(images.expand(draws, -1, -1, -1), seed=0, indices=range(draws))
    bound = (DIM * math.log(255 / 2) - closed_form(model, y)) / (DIM * math.log(2))
    expected = (0.5 + math.log(math.sqrt(2 * math.pi / 3) / 2)) / math.log(2)
    assert expected == pytest.approx(0.2546, abs=1e-4)
    assert abs(float(bound.mean()) - expected) < 0.015, (float(bound.mean()), float(bound.std() / draws ** 0.5))


def test_an_image_gets_the_same_value_in_any_batch():
    model = gaussian()
    images = gaussian_images(model, 12)
    indices = list(range(40, 52))
    run = dict(seed=5, steps=8, probes=2)
    whole = nll_bits_per_dim(model, images, indices, batch_size=12, **run)
    # equal up to the float32 rounding of the network, which may differ between batch sizes
    torch.testing.assert_close(nll_bits_per_dim(model, images, indices, batch_size=5, **run), whole,
                               atol=1e-5, rtol=0)
    # another process holding images 43..46 alone gets the same values for them
    torch.testing.assert_close(nll_bits_per_dim(model, images[3:7], indices[3:7], **run), whole[3:7],
                               atol=1e-5, rtol=0)


def test_error_is_second_order_in_the_steps():
    model = gaussian()
    y = gaussian_samples(model, 64)
    expected = bits(closed_form(model, y))

    def mean_error(steps: int) -> float:
        with torch.no_grad():
            log_p = log_likelihood(model, y, None, SIGMA_MIN, SIGMA_MAX, steps=steps)
        return float((bits(log_p) - expected).mean().abs())

    errors = [mean_error(steps) for steps in (16, 32, 64, 128)]
    ratios = [fine / coarse for coarse, fine in zip(errors, errors[1:])]
    assert all(0.15 < r < 0.35 for r in ratios), (errors, ratios)  # 1/4 for Heun, 1/2 for Euler
    assert mean_error(DEFAULT_STEPS) < 0.0125, "DEFAULT_STEPS no longer brings the bias to ~0.01 bits/dim"


def test_step_doubling_estimates_the_discretisation_error():
    """evaluation.measurements.step_error from 16 and 32 steps (the same images): the reported 16-step value
    minus it lands within a tenth of the 16-step error of the closed form."""
    model = gaussian()
    y = gaussian_samples(model, 64)
    with torch.no_grad():
        coarse, fine = (bits(log_likelihood(model, y, None, SIGMA_MIN, SIGMA_MAX, steps=steps)) for steps in (16, 32))
    exact = bits(closed_form(model, y))
    error = step_error(-coarse, -fine)  # bits/dim of an NLL: minus the log-likelihood's
    reported, truth = float((-coarse).mean()), float((-exact).mean())
    assert abs(reported - truth) > 0.01  # 16 steps are visibly biased ...
    assert abs(reported - error["mean"] - truth) < 0.1 * abs(reported - truth)  # ... and the extrapolation is not
    assert error["n"] == 64 and error["se"] > 0


def random_unet_denoiser(resolution: int, seed: int = 0) -> Denoiser:
    """The tiny UNet with its zero-initialised tensors filled: as built, its output layer is zero and
    D = c_skip x, whose Jacobian is diagonal (probes would be exact)."""
    torch.manual_seed(seed)
    net = build_unet("tiny", resolution, 1)
    with torch.no_grad():
        for parameter in net.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return Denoiser(net).eval()


def test_unet_probes_agree_with_the_exact_trace():
    denoiser = random_unet_denoiser(8)
    y = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    repeats = 48
    signs = torch.randint(0, 2, (3 * repeats, 1, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
    # 4 steps suffice: the probes do not move the state, so their mean is the exact-trace result at any steps
    with torch.no_grad():  # as evaluation code calls it
        exact = log_likelihood(denoiser, y, None, steps=4)
        single_probes = log_likelihood(denoiser, y.repeat_interleave(repeats, 0), signs.float(), steps=4)
    single_probes = single_probes.reshape(3, repeats)
    standard_error = single_probes.std(dim=1) / math.sqrt(repeats)
    assert (standard_error > 0).all()
    gap = single_probes.mean(dim=1) - exact
    assert (gap.abs() < 3.5 * standard_error).all(), (gap, standard_error)
    assert all(p.grad is None for p in denoiser.parameters())


def test_unet_bits_per_dim_shape_and_finiteness():
    denoiser = Denoiser(build_unet("tiny", 16, 1)).eval()
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    values = nll_bits_per_dim(denoiser, images, [0, 1, 2], seed=0, steps=4, probes=1)
    assert values.shape == (3,) and values.dtype == torch.float64 and torch.isfinite(values).all()
    assert len(nll_bits_per_dim(denoiser, images[:0], [], seed=0, steps=4)) == 0


def tiny_unets(count: int) -> list[Denoiser]:
    """`count` 8x8 tiny UNet denoisers with other weights each, frozen as a fused model freezes them."""
    return [random_unet_denoiser(8, seed).requires_grad_(False) for seed in range(count)]


def random_router(classes: int) -> Router:
    """An 8x8 `tiny` router whose posteriors vary with x (perturbed weights)."""
    torch.manual_seed(5)
    router = Router(8, 1, classes)
    with torch.no_grad():
        for parameter in router.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return router


def probes_and_images(batch: int = 2, probes: int = 3):
    y = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    signs = torch.randint(0, 2, (batch, probes, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
    return y, signs.float()


@pytest.mark.parametrize("fusion", ["barycenter", "mixture", "hybrid"])
def test_the_trace_taken_one_network_at_a_time_equals_the_joint_one(fusion):
    """A fused model's weighted_networks lets the trace be taken one network at a time; hiding it (a plain
    callable) differentiates the whole fused forward at once. Same probes: equal to float32 rounding. For the
    mixture the router's term, sum_k (v . D_k)(grad w_k . v), is part of it (0.1-0.3 nats here)."""
    models = tiny_unets(3)
    lam, pi = torch.tensor([0.5, 0.7, -0.2]), torch.tensor([0.5, 0.3, 0.2])
    model = {"barycenter": lambda: FusedDenoiser(models, lam),
             "mixture": lambda: MixtureDenoiser(models, random_router(3), pi),
             # the 2-step ODE's sigmas, 80, 1.1 and 0.002, fall on both sides of sigma_star
             "hybrid": lambda: HybridDenoiser(models, random_router(3), pi, lam, sigma_star=1.0)}[fusion]()
    y, probes = probes_and_images()
    with torch.no_grad():
        split = log_likelihood(model, y, probes, steps=2)
        joint = log_likelihood(lambda x, sigma: model(x, sigma), y, probes, steps=2)
    torch.testing.assert_close(split, joint, atol=1e-3, rtol=0)


class SavedBytes:
    """A peak-memory proxy: the bytes of the tensors that autograd's live graphs hold for their backward passes
    (saved_tensors_hooks), counted when saved and uncounted when the graph lets them go."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        size = tensor.nelement() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return tensor, Release(self, size)

    def peak_of(self, denoiser, y, probes) -> int:
        with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(self.pack, lambda packed: packed[0]):
            log_likelihood(denoiser, y, probes, steps=1)
        return self.peak


class Release:
    def __init__(self, counter: SavedBytes, size: int):
        self.counter, self.size = counter, size

    def __del__(self):
        self.counter.live -= self.size


def test_one_network_graph_at_a_time():
    """The fused model of K = 3 networks holds one network's graph at a time, as a lone network does (the
    joint forward holds all three); the mixture holds one network's and its router's."""
    models = tiny_unets(3)
    fused = FusedDenoiser(models, torch.tensor([0.5, 0.7, -0.2]))
    y, probes = probes_and_images()
    one = SavedBytes().peak_of(lambda x, sigma: models[0](x, sigma), y, probes)
    assert SavedBytes().peak_of(fused, y, probes) == one
    assert SavedBytes().peak_of(lambda x, sigma: fused(x, sigma), y, probes) >= 2.9 * one
    mixture = MixtureDenoiser(models, random_router(3), torch.tensor([0.5, 0.3, 0.2]))
    assert one < SavedBytes().peak_of(mixture, y, probes) < 1.5 * one  # the tiny router's encoder: 0.2 x


def test_the_network_runs_without_tf32():
    """cuDNN's and cuBLAS's TF32 flags (PyTorch's default for convolutions on Ampere+) are off inside the NLL,
    and restored after it."""
    seen = []

    class Recording(nn.Module):
        def forward(self, x, sigma):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return x * 0.5

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        images = torch.randint(0, 256, (2, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        nll_bits_per_dim(Recording(), images, [0, 1], seed=0, steps=2)
        assert seen and set(seen) == {(False, False)}
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_the_mixture_nll_is_the_gaussian_mixture_density():
    """With the exact posterior as the router (tests/test_mixture.py's GaussianRouter), the mixture denoiser of
    N(mu_i, S^2 I), i = 1..3, with weights pi is the exact denoiser of sum_i pi_i N(mu_i, S^2 I): its PF-ODE
    likelihood (the exact trace, the router's term sum_k (v . D_k)(grad w_k . v) included) is the smoothed
    mixture's density log sum_i pi_i N(y; mu_i, (S^2 + sigma_min^2) I), up to the prior's and the steps' errors
    (docs/METHODS.md §1c): within 0.005 bits/dim here, while leaving the router's term out is off by 0.02-0.25."""
    from tests.test_mixture import PI, S, SHAPE as MIXTURE_SHAPE, GaussianRouter, means
    mus = means()
    model = MixtureDenoiser([GaussianDenoiser(mu, S) for mu in mus], GaussianRouter(mus), PI)
    g = torch.Generator().manual_seed(2)
    components = torch.tensor([0, 0, 1, 2, 0, 1])
    y = torch.stack(mus).double()[components] + S * torch.randn(len(components), *MIXTURE_SHAPE, generator=g,
                                                                dtype=torch.float64)
    with torch.no_grad():
        log_p = log_likelihood(model, y, None, SIGMA_MIN, SIGMA_MAX, steps=128)
    dim, variance = y[0].numel(), S ** 2 + SIGMA_MIN ** 2
    squared = (y.flatten(1)[:, None] - torch.stack(mus).double().flatten(1)[None]).square().sum(-1)
    density = torch.logsumexp(PI.log() - squared / (2 * variance) - 0.5 * dim * math.log(2 * math.pi * variance),
                              dim=1)
    torch.testing.assert_close(log_p / (dim * math.log(2)), density / (dim * math.log(2)), atol=0.01, rtol=0)
