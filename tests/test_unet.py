"""DDPM++ UNet: shapes, EDM's parameter count, trainability of the CPU preset, config errors."""
import pytest
import torch

from trainer.edm import Denoiser, loss_weight
from trainer.unet import PRESETS, build_unet, group_norm


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset, resolution, channels, batch", [
    ("tiny", 16, 1, 4),
    ("ddpmpp-cifar10", 32, 3, 1),
    ("ddpmpp-28", 28, 1, 1),
    ("ddpmpp-64", 64, 3, 1),
])
def test_output_shape_equals_input_shape(preset, resolution, channels, batch):
    net = build_unet(preset, resolution, channels).eval()
    x = torch.randn(batch, channels, resolution, resolution)
    with torch.no_grad():
        assert net(x, torch.randn(batch)).shape == x.shape


def test_cifar10_preset_has_edm_parameter_count():
    count = parameter_count(build_unet("ddpmpp-cifar10", 32, 3))
    assert abs(count / 55.7e6 - 1) < 0.03, count


def test_tiny_preset_is_small():
    assert parameter_count(build_unet("tiny", 16, 1)) < 1_000_000


def _fixed_batch():
    """16 blurred binary 16x16 images with fixed noise levels and noise."""
    generator = torch.Generator().manual_seed(0)
    x0 = (torch.rand(16, 1, 16, 16, generator=generator) > 0.5).float() * 2 - 1
    x0 = torch.nn.functional.avg_pool2d(x0, 3, stride=1, padding=1)
    sigma = (torch.randn(16, generator=generator) * 1.2 - 1.2).exp()
    return x0, sigma, torch.randn(x0.shape, generator=generator)


def _fixed_batch_loss(denoiser, x0, sigma, noise):
    s = sigma.reshape(-1, 1, 1, 1)
    squared_error = (denoiser(x0 + s * noise, sigma) - x0).square().mean(dim=(1, 2, 3))
    return (loss_weight(sigma, denoiser.sigma_data) * squared_error).mean()


def test_tiny_overfits_a_fixed_batch():
    torch.manual_seed(0)
    denoiser = Denoiser(build_unet("tiny", 16, 1))
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=2e-3)
    batch = _fixed_batch()
    losses = []
    for _ in range(30):
        loss = _fixed_batch_loss(denoiser, *batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_every_parameter_gets_gradient():
    # The zero-initialised last convs block gradients for the first steps (output conv, then the
    # blocks' conv1, then what feeds them); after three steps every layer must be wired into the
    # output (catches an unused embedding, attention or skip).
    torch.manual_seed(0)
    denoiser = Denoiser(build_unet("tiny", 16, 1))
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    batch = _fixed_batch()
    for _ in range(3):
        optimizer.zero_grad()
        _fixed_batch_loss(denoiser, *batch).backward()
        optimizer.step()
    silent = [name for name, p in denoiser.named_parameters()
              if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError) as error:
        build_unet("ddpm-huge", 32, 3)
    assert all(name in str(error.value) for name in PRESETS)


def test_attention_resolution_must_be_a_level():
    with pytest.raises(ValueError, match="attention"):
        build_unet("tiny", 32, 1)  # levels 32/16/8: the preset's 4x4 attention would vanish


def test_resolution_must_survive_downsampling():
    with pytest.raises(ValueError, match="divisible"):
        build_unet("ddpmpp-64", 36, 3)


def test_dropout_override():
    net = build_unet("tiny", 16, 1, dropout=0.3)
    rates = {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.3}


@pytest.mark.parametrize("channels, groups", [(16, 4), (96, 24), (256, 32), (384, 32), (3, 1)])
def test_group_norm_groups_divide_channels(channels, groups):
    assert group_norm(channels).num_groups == groups
