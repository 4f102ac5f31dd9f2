"""Does a model copy its training images? With a few hundred training images a diffusion model can learn them
by heart, and then a low FID says nothing about generalisation (Yoon et al. 2023; Carlini et al. 2023).

Two signs, both in pixel space: a sample counts as a copy when its nearest training image is much closer than
the second nearest (the ratio test of docs/METHODS.md §1c), and a copying model's samples are much closer to its
training images than to held-out images of the same distribution.

Pixel convention: every image here is uint8 [*, C, H, W], the stored pixels and what the Fréchet distance
sees; turn samples in [-1, 1] into them with shards.pixels.to_uint8. Distances are the L2 norm over the
C*H*W values on that 0..255 scale (divide by 127.5 for the networks' [-1, 1] scale). They are computed in
float64 on the integer values, where every sum is exact (255^2 * C*H*W < 2^53): an exact copy is at
distance exactly 0, and the chunked search gives the same numbers as a brute-force one.
"""
import io
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from shards.atomic import write_atomically

PADDING = 1  # pixels between cells of the copies figure, before scaling


def _check_images(name: str, images: torch.Tensor, minimum: int) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"{name}: expected uint8 images [B, C, H, W] (shards.pixels.to_uint8 converts [-1, 1] "
                         f"floats), got {images.dtype} {tuple(images.shape)}")
    if len(images) < minimum:
        raise ValueError(f"{name}: need at least {minimum} images, got {len(images)}")


def nearest_neighbours(samples: torch.Tensor, images: torch.Tensor, chunk: int = 1024,
                       device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nearest distance [N], second-nearest distance [N], nearest index [N]) from each of the uint8
    `samples` [N, C, H, W] to the uint8 `images` [M, C, H, W], M >= 2, distances as float64, on the CPU.

    Squared distances come from |s|^2 + |x|^2 - 2 s.x, `chunk` samples at a time on `device`: memory is
    chunk x M float64 plus the images as float64, never N x M x C*H*W. One core does 50,000 samples against
    1,000 CIFAR images (C*H*W = 3072) in about 6 s. Every sum is exact (the module docstring), so a GPU gives
    the same distances as the CPU.
    """
    _check_images("samples", samples, 1)
    _check_images("images", images, 2)
    if samples.shape[1:] != images.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape[1:])} and images {tuple(images.shape[1:])} differ in shape")
    x = images.flatten(1).to(device, torch.float64)
    x_norms = x.square().sum(1)
    first, second, index = [], [], []
    for s in samples.flatten(1).split(chunk):
        s = s.to(device, torch.float64)
        squared = s.square().sum(1, keepdim=True) + x_norms - 2 * s @ x.T
        values, rows = squared.topk(2, dim=1, largest=False)
        first.append(values[:, 0])
        second.append(values[:, 1])
        index.append(rows[:, 0])
    return torch.cat(first).sqrt().cpu(), torch.cat(second).sqrt().cpu(), torch.cat(index).cpu()


def memorisation(samples: torch.Tensor, train_images: torch.Tensor, held_out_images: torch.Tensor,
                 threshold: float = 1 / 3, device="cpu") -> dict:
    """How much `samples` copy `train_images` (all uint8 [*, C, H, W]; at least 2 training images), the
    distances computed on `device`.

    Returns
      copy_share:        share of samples whose nearest training image is closer than threshold x the second
                         nearest; an exact copy counts even when the training set holds that image twice
      train_distance:    mean distance from a sample to its nearest training image
      held_out_distance: the same to the held-out images. A model that copies is much closer to its training
                         set than to held-out images; compare sets of equal size, since the nearest of more
                         images is nearer
      ratio:             [N] float64, nearest / second-nearest training distance (0 for an exact copy)
      nearest:           [N] int64, index of the nearest training image
    """
    _check_images("train_images (the copy test compares the nearest with the second nearest)", train_images, 2)
    first, second, nearest = nearest_neighbours(samples, train_images, device=device)
    held_out_first, _, _ = nearest_neighbours(samples, held_out_images, device=device)
    ratio = _ratio(first, second)
    return {
        "copy_share": float((ratio < threshold).double().mean()),
        "train_distance": float(first.mean()),
        "held_out_distance": float(held_out_first.mean()),
        "ratio": ratio,
        "nearest": nearest,
    }


def copy_share(samples: torch.Tensor, images: torch.Tensor, threshold: float = 1 / 3, device="cpu") -> float:
    """memorisation()'s copy share of `samples` against another set of `images` a model learnt from (the
    auxiliaries' training images, the distillation teacher's fixed samples): the ratio test alone."""
    _check_images("images (the copy test compares the nearest with the second nearest)", images, 2)
    first, second, _ = nearest_neighbours(samples, images, device=device)
    return float((_ratio(first, second) < threshold).double().mean())


def _ratio(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return torch.where(first == 0, 0.0, first / second)  # first > 0 implies second > 0


def copies_figure(samples: torch.Tensor, train_images: torch.Tensor, result: dict, path: Path, count: int = 8,
                  scale: int = 4) -> None:
    """A PNG of the `count` most copied samples (smallest ratio, most copied on the left) in the top row,
    each above its nearest training image, so a person can see what the copy share counts.

    `result` is memorisation(samples, train_images, ...). The picture is RGB (make_grid repeats grey),
    count x 2 cells of H x W with PADDING between them, enlarged `scale` times with nearest-neighbour so
    16x16 digits stay sharp. The file is replaced atomically.
    """
    order = result["ratio"].argsort()[:count]
    pairs = torch.cat([samples[order], train_images[result["nearest"][order]]])
    grid = make_grid(pairs, nrow=len(order), padding=PADDING)  # uint8 [3, H', W']
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_atomically(Path(path), buffer.getvalue())
