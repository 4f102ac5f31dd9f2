"""Reproducible random draws: every generator is seeded by a tuple of words, never by its position in a
shared stream.

A word tuple names one draw: (run seed, stream, index, ...). `Stream` keeps the different uses apart, so
two of them can never share a seed by accident (the latents of evaluation image 7 and the teacher's image
7, say). Per-image seeding, as NVlabs/edm's generate.py does it: image i of a model is drawn from its own
generator, so it is the same image whatever the batch size, the number of processes or the chunking.
"""
from enum import IntEnum
from typing import Sequence

import numpy as np
import torch


class Stream(IntEnum):
    """The second word of every seed: what the draw is for."""
    SAMPLES = 1       # latents of a model's evaluation samples (and of `scorefuse sample`)
    GRID = 2          # latents of the sample grids, the same for every model and snapshot
    TEACHER = 3       # latents of the distillation teacher's samples
    GRAM = 4          # (sigma, noise) draws of the fuse stage's Gram pass, per target batch
    TEST_LOSS = 5     # (sigma, noise) draws of the held-out denoising loss, per image
    LIKELIHOOD = 6    # dequantisation noise and Hutchinson probes of the NLL, per image
    BOOTSTRAP = 7     # resampling of the evaluation intervals
    SPLIT = 8         # random splits (floors, classifier hold-out)
    REAL_MIX = 9      # which "real" samples of the distillation are target images
    LAMBDA_INIT = 10  # the paper's N(0, 1) logits of the SGD fit of lambda
    MIXTURE = 11      # the noise of the router's density ratios on the target images, per target batch
    LAMBDA_SGD = 12   # torch's global RNG of the SGD fit of lambda, per rank: its (sigma, noise) draws
    ROUTER_DATA = 13  # the router's training stream of each auxiliary population
    REAL_MIX_DATA = 14  # the stream of target images distillation mixes into its "real" side
    CLASSIFIER_INIT = 15  # the feature classifier's initial weights
    ROUTER_SAMPLES = 16  # latents of a pretrained auxiliary's samples that the router trains on, and their stream
    VALIDATION = 17   # which target images the baselines hold out for early stopping
    REPLICATE = 18    # the seed of the sweep's replicate r > 0 of the target draw, from data.target.seed
    ROUTER_CHECK = 19  # the (sigma, noise) draws of the router's calibration check, per batch
    VALIDATION_GRAM = 20  # the (sigma, noise) draws of the held-out target images' Gram statistics, per batch
    ENSEMBLE_COPY = 21  # the train.seed of copy c of the auxiliary in the seed ensemble
    AUX_REPLICATE = 22  # the train.seed of the auxiliaries of the sweep's replicate r (sweep.aux_seeds)


def seed_of(*words: int) -> int:
    """A 32-bit seed that depends on every word (numpy's SeedSequence hashing; the word count is hashed too,
    since SeedSequence alone ignores trailing zeros). 32 bits because that is all torch's CPU generator
    (mt19937) takes."""
    return int(np.random.SeedSequence([len(words), *map(int, words)]).generate_state(1, np.uint32)[0])


def generator(*words: int, device="cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded by `words`. Draw on the generator's own device: PyTorch refuses
    a draw whose tensor lives on another device than its generator (a CPU generator cannot fill CUDA memory)."""
    return torch.Generator(device=device).manual_seed(seed_of(*words))


def image_seed(seed: int, stream: Stream, index: int) -> int:
    """The seed of image `index` of a stream: consecutive from a hashed base, so no two images of one stream
    share a seed (hashing each index into 32 bits would give a few equal latents among 50,000 samples)."""
    return (seed_of(seed, stream) + int(index)) % 2 ** 32


def per_image_normal(seed: int, stream: Stream, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """N(0, I) tensors [len(indices), *shape] on the CPU, image i from its own generator (image_seed). Move
    the result to the device that needs it."""
    if len(indices) == 0:
        return torch.zeros((0, *shape))
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(image_seed(seed, stream, i)))
                        for i in indices])


def normal(shape: Sequence[int], generator: torch.Generator | None = None, device=None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) of `shape` on `device`: from `generator`, drawn on the generator's own device and then moved
    (a CPU generator cannot draw CUDA tensors), or from torch's global RNG on `device` when it is None (the
    training noise, whose per-rank state every checkpoint saves)."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
