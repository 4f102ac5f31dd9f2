"""EDM parts checked against closed forms: for Gaussian data N(0, s^2 I) with sigma_data = s the
denoiser with F = 0 is the optimal one, its weighted loss has expectation exactly 1, and the
probability-flow ODE has the exact solution x(sigma) = x(sigma_max) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2)."""
import math

import pytest
import torch
from torch import nn

from trainer.edm import (Denoiser, denoising_loss, heun_sample, loss_weight, sample_sigma,
                         sigma_steps)
from trainer.gaussian import GaussianDenoiser

SIGMA_DATA = 0.5


class ConstantNet(nn.Module):
    """F = constant, recording what the preconditioning feeds it."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.value = value

    def forward(self, x, noise_labels):
        self.seen_input, self.seen_labels = x, noise_labels
        return torch.full_like(x, self.value)


# The optimal D for data N(0, SIGMA_DATA^2 I) of 1x2x2 images, in the sampler's float64.
gaussian_denoiser = GaussianDenoiser(torch.zeros(1, 2, 2), SIGMA_DATA, sigma_data=SIGMA_DATA, dtype=None)


def exact_gaussian_flow(latents, sigma_max=80.0):
    """Where the probability-flow ODE of N(0, SIGMA_DATA^2 I) takes latents * sigma_max at sigma = 0."""
    return latents * sigma_max * SIGMA_DATA / math.sqrt(SIGMA_DATA ** 2 + sigma_max ** 2)


def test_zero_net_denoiser_is_c_skip_times_x():
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    denoised = Denoiser(ConstantNet(0.0), SIGMA_DATA)(x, sigma)
    c_skip = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
    torch.testing.assert_close(denoised, c_skip.reshape(-1, 1, 1, 1) * x, rtol=1e-6, atol=0)


def test_preconditioning_coefficients():
    net = ConstantNet(1.0)
    x = torch.randn(3, 1, 2, 2)
    sigma = torch.tensor([0.1, 0.5, 10.0])
    denoised = Denoiser(net, SIGMA_DATA)(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    total = (s ** 2 + SIGMA_DATA ** 2).sqrt()
    torch.testing.assert_close(net.seen_input, x / total)
    torch.testing.assert_close(net.seen_labels, sigma.log() / 4)
    expected = SIGMA_DATA ** 2 / total ** 2 * x + s * SIGMA_DATA / total
    torch.testing.assert_close(denoised, expected)


def test_sigma_shapes_are_interchangeable():
    denoiser = Denoiser(ConstantNet(1.0), SIGMA_DATA)
    x = torch.randn(2, 1, 3, 3)
    reference = denoiser(x, torch.tensor([0.7, 0.7]))
    for sigma in (0.7, torch.tensor(0.7), torch.full((2, 1, 1, 1), 0.7)):
        torch.testing.assert_close(denoiser(x, sigma), reference)


def test_denoiser_returns_float32_under_autocast():
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, noise_labels):
            self.output_dtype = (out := self.conv(x)).dtype
            return out

    net = ConvNet()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        denoised = Denoiser(net, SIGMA_DATA)(torch.randn(2, 1, 4, 4), torch.tensor([0.1, 1.0]))
    assert net.output_dtype == torch.bfloat16  # the network itself did run in bf16
    assert denoised.dtype == torch.float32


def test_loss_weight_is_inverse_c_out_squared():
    sigma = torch.tensor([0.002, 0.3, 80.0], dtype=torch.float64)
    c_out = sigma * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
    torch.testing.assert_close(loss_weight(sigma, SIGMA_DATA), 1 / c_out ** 2)


@pytest.mark.parametrize("sigma", [0.01, 0.5, 20.0])
def test_optimal_gaussian_denoiser_has_unit_expected_loss(sigma):
    # D - x0 = -(1 - c_skip) x0 + c_skip sigma n has per-pixel variance c_out^2, so w * mse has
    # expectation 1; per sample it is a chi^2_P / P variable, std sqrt(2 / P).
    generator = torch.Generator().manual_seed(1)
    x0 = SIGMA_DATA * torch.randn(256, 1, 16, 16, generator=generator)
    denoiser = Denoiser(ConstantNet(0.0), SIGMA_DATA)
    loss = denoising_loss(denoiser, x0, generator, p_mean=math.log(sigma), p_std=0.0)
    assert loss.shape == (256,)
    standard_error = math.sqrt(2 / (256 * 16 * 16))
    assert abs(loss.mean().item() - 1) < 5 * standard_error


def test_loss_is_a_pure_function_of_the_generator_state():
    x0 = torch.randn(4, 1, 8, 8)
    denoiser = Denoiser(ConstantNet(0.0), SIGMA_DATA)
    loss = denoising_loss(denoiser, x0, torch.Generator().manual_seed(7), p_mean=-1.2, p_std=1.2)
    replay = torch.Generator().manual_seed(7)
    sigma = sample_sigma(4, replay, -1.2, 1.2).reshape(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=replay)
    c_skip = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
    expected = loss_weight(sigma.flatten(), SIGMA_DATA) * (
        (c_skip * (x0 + sigma * noise) - x0).square().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(loss, expected)


def test_sample_sigma_is_reproducible_and_log_normal():
    first = sample_sigma(20000, torch.Generator().manual_seed(3), p_mean=-1.2, p_std=1.2)
    second = sample_sigma(20000, torch.Generator().manual_seed(3), p_mean=-1.2, p_std=1.2)
    assert torch.equal(first, second)
    assert abs(first.log().mean().item() + 1.2) < 0.05
    assert abs(first.log().std().item() - 1.2) < 0.05


def test_sigma_steps_endpoints_and_order():
    steps = sigma_steps(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert steps.shape == (19,) and steps.dtype == torch.float64
    assert steps[0].item() == pytest.approx(80.0)
    assert steps[-2].item() == pytest.approx(0.002)
    assert steps[-1].item() == 0.0
    assert (steps[1:] < steps[:-1]).all()


def test_sigma_steps_with_rho_one_is_linear():
    torch.testing.assert_close(sigma_steps(5, 1.0, 5.0, rho=1.0),
                               torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64))


def test_sigma_steps_rejects_a_single_step():
    with pytest.raises(ValueError):
        sigma_steps(1)


def test_heun_gaussian_at_edm_default_steps_has_data_std():
    latents = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    samples = heun_sample(gaussian_denoiser, latents, num_steps=18)
    assert samples.dtype == latents.dtype
    # 18 Heun steps leave a 5.5% discretisation error on this ODE (see the convergence test).
    assert abs(samples.std().item() / SIGMA_DATA - 1) < 0.08


def test_heun_converges_at_second_order_to_the_exact_flow():
    latents = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = exact_gaussian_flow(latents.double())

    def error(num_steps):
        samples = heun_sample(gaussian_denoiser, latents.double(), num_steps=num_steps)
        return ((samples - exact).abs() / exact.abs()).max().item()

    coarse, fine = error(64), error(128)
    assert fine < 1e-3
    assert coarse / fine == pytest.approx(4.0, rel=0.15)


def test_heun_with_zero_net_denoiser_matches_the_gaussian_flow():
    # Denoiser(F = 0) is the optimal Gaussian denoiser, so the Module path meets the closed form.
    latents = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    samples = heun_sample(Denoiser(ConstantNet(0.0), SIGMA_DATA), latents, num_steps=128)
    torch.testing.assert_close(samples, exact_gaussian_flow(latents), rtol=2e-3, atol=1e-6)


def test_heun_point_mass_lands_on_it_exactly():
    mu = torch.tensor([0.3, -0.7]).reshape(1, 2, 1, 1)
    calls = []

    def point_mass(x, sigma):
        calls.append(sigma.shape)
        return mu.to(x.dtype).expand_as(x)

    latents = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    samples = heun_sample(point_mass, latents, num_steps=10)
    torch.testing.assert_close(samples, mu.expand_as(samples), rtol=0, atol=1e-6)
    assert len(calls) == 2 * 10 - 1
    assert all(shape == (5, 1, 1, 1) for shape in calls)
