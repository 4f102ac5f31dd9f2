"""The target test loss: EDM-weighted denoising score matching on held-out images.

Every model is scored on the same (image, sigma, noise) draws (the generator is re-seeded per model),
so differences between rows of the report are differences between models, not between draws. With the
same sigma distribution and weighting as training, it is the loss ScoreFusion minimises over lambda.
"""
import torch

from trainer.edm import denoising_loss


@torch.no_grad()
def denoising_test_loss(denoiser, images: torch.Tensor, draws_per_image: int, p_mean: float, p_std: float,
                        sigma_data: float, seed: int = 0, batch_size: int = 256, device="cpu") -> float:
    """Mean EDM loss of `denoiser` (any (x, sigma) -> x0 callable on `device`) over uint8 `images` [N, C, H, W]."""
    generator = torch.Generator(device).manual_seed(seed)
    x0 = images.float().div(127.5).sub(1).to(device)
    total, count = 0.0, 0
    for _ in range(draws_per_image):
        for chunk in x0.split(batch_size):
            total += float(denoising_loss(denoiser, chunk, generator, p_mean, p_std, sigma_data).double().sum())
            count += len(chunk)
    return total / count
