"""The held-out denoising loss: EDM-weighted denoising score matching on images a model never saw.

Every model is scored on the same (image, sigma, noise) draws: image i's draws come from its own generator
(shards.seeds, Stream.TEST_LOSS), so differences between rows of the report are differences between models,
not between draws, and per-image values of two models are paired. With the training loss's sigma law and
weighting, it is the loss ScoreFusion minimises over lambda, measured on held-out images.
"""
from typing import Sequence

import torch

from trainer.edm import loss_weight
from shards.pixels import to_unit
from shards.seeds import Stream, generator


def draws(seed: int, indices: Sequence[int], count: int, shape, p_mean: float, p_std: float):
    """(sigma [N, count], noise [N, count, C, H, W]) of images `indices`, on the CPU: sigma then noise from
    each image's own generator, sigma log-normal as in training."""
    sigmas, noises = [], []
    for i in indices:
        g = generator(seed, Stream.TEST_LOSS, int(i))
        sigmas.append((torch.randn(count, generator=g) * p_std + p_mean).exp())
        noises.append(torch.randn((count, *shape), generator=g))
    return torch.stack(sigmas), torch.stack(noises)


@torch.no_grad()
def held_out_loss(denoiser, images: torch.Tensor, indices: Sequence[int], draws_per_image: int, p_mean: float,
                  p_std: float, sigma_data: float, seed: int = 0, batch_size: int = 256, device="cpu") -> torch.Tensor:
    """Per-image mean EDM loss over `draws_per_image` draws, float64 [N] on the CPU, of `denoiser` (any
    (x, sigma) -> x0 callable on `device`) on uint8 `images` [N, C, H, W] whose global indices are `indices`."""
    sigma, noise = draws(seed, indices, draws_per_image, images.shape[1:], p_mean, p_std)
    x0 = to_unit(images)[:, None].expand_as(noise).flatten(0, 1)
    sigma, noise = sigma.flatten(), noise.flatten(0, 1)
    losses = []
    for start in range(0, len(x0), batch_size):
        part = slice(start, start + batch_size)
        s = sigma[part].to(device).reshape(-1, 1, 1, 1)
        clean = x0[part].to(device)
        denoised = denoiser(clean + s * noise[part].to(device), s)
        error = (denoised.float() - clean).square().flatten(1).mean(dim=1)
        losses.append((loss_weight(s.flatten(), sigma_data) * error).double().cpu())
    return torch.cat(losses).reshape(len(images), draws_per_image).mean(dim=1) if losses else torch.zeros(0)
