"""What a sample set is made of: its latents, seeded per chunk, and the one quantisation from model
output to pixels. The Fréchet distance, `scorefuse sample` and the distillation teacher's shards draw
their latents with `chunk_latents`, so the same seed gives the same images on any number of ranks (and
`sample` the images `evaluate` scored); every PNG and shard quantises with `to_uint8`."""
from typing import Sequence

import numpy as np
import torch


def chunk_latents(seed: int, chunk: int, batch_size: int, image_shape: Sequence[int]) -> torch.Tensor:
    """The latents of one batch-sized chunk of the sample set, from a generator seeded by (seed, chunk).

    Seeding by chunk rather than by rank makes the sample set independent of the world size: the same
    seed gives the same samples, hence the same distance, on 1 or 8 GPUs.
    """
    chunk_seed = int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0])
    generator = torch.Generator().manual_seed(chunk_seed)
    return torch.randn((batch_size, *image_shape), generator=generator)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255], clamped and rounded (not truncated, which would bias dark)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
