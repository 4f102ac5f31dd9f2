"""Fréchet distance between a sampler and a reference population, through torch-fidelity, on any number of ranks.

Two feature extractors: "inception" is torch-fidelity's `inception-v3-compat` at its 2048-d pool layer,
i.e. the standard FID of the papers (METHODS.md §3); "digit-classifier" is the small CNN of
evaluation.digit_classifier, for the embedded 16x16 digits, where Inception is slow and says little. The
extractor is built by torch-fidelity's own factory and the distance by its own statistics functions, so
the numbers are torch-fidelity's numbers; this module adds sampling from our models, the reference cache
and the spreading of the work over ranks.
"""
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import create_feature_extractor

from evaluation.digit_classifier import EXTRACTOR_NAME as DIGIT_CLASSIFIER  # importing it registers it
from evaluation.errors import EvaluationError
from shards.files import sha256_file, write_atomically
from trainer.samples import chunk_latents, to_uint8

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class Extractor:
    registry_name: str  # the name torch-fidelity's registry knows
    feature: str        # the feature layer the distance is computed on
    metric_prefix: str  # fid for Inception; anything else must not be called FID


EXTRACTORS = {
    "inception": Extractor("inception-v3-compat", "2048", "fid"),
    "digit-classifier": Extractor(DIGIT_CLASSIFIER, "features", "fd_digits"),
}


def resolve_extractor(name: str) -> Extractor:
    if name not in EXTRACTORS:
        raise EvaluationError(f"unknown feature extractor {name!r} (eval.extractor): use one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name]


def metric_name(extractor: str, num_samples: int) -> str:
    """fid50k, fid2k, fid64, fd_digits2k: a metric is named by its sample count, since fid10k is not fid50k."""
    count = f"{num_samples // 1000}k" if num_samples % 1000 == 0 else str(num_samples)
    return resolve_extractor(extractor).metric_prefix + count


def build_feature_extractor(extractor: str, weights_path: Optional[str], device) -> nn.Module:
    """torch-fidelity's extractor with local weights; every loading failure becomes one EvaluationError."""
    choice = resolve_extractor(extractor)
    if weights_path is not None and not Path(weights_path).is_file():
        raise EvaluationError(f"{extractor} weights not found: {weights_path}")
    try:
        module = create_feature_extractor(choice.registry_name, [choice.feature], cuda=False,
                                          feature_extractor_weights_path=weights_path, verbose=False)
    except EvaluationError:
        raise
    except Exception as error:  # download failure (URLError), wrong shapes (RuntimeError), not a checkpoint...
        if weights_path is None:
            raise EvaluationError(
                f"could not load the Inception weights ({error}); set eval.inception_weights to a local copy of "
                f"{INCEPTION_FILE} (the same file torch-fidelity downloads from {INCEPTION_URL})") from error
        raise EvaluationError(f"could not load {extractor} weights from {weights_path}: {error}") from error
    return module.to(device)


def weights_fingerprint(weights_path: Optional[str]) -> str:
    """sha256 of the weights file: cached reference statistics are only valid for the weights that made them."""
    if weights_path is None:
        return "torch-fidelity-default"
    return sha256_file(weights_path)


def as_extractor_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 1|3, H, W] -> uint8 [B, 3, H, W], torch-fidelity's input convention (grey replicated)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [B, 1|3, H, W], got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class SampleGenerator(nn.Module):
    """Any sampler as a torch-fidelity generator: latents in, uint8 [B, 3, H, W] out.

    `sample_fn(latents [B, C, H, W] float32) -> images [B, C, H, W] in [-1, 1]`. torch-fidelity draws flat
    latents of size C*H*W, reshaped here to `image_shape`, so it fits
    `torch_fidelity.GenerativeModelModuleWrapper(SampleGenerator(fn, shape), C*H*W, "normal", 0)`.
    """

    def __init__(self, sample_fn: Callable[[torch.Tensor], torch.Tensor], image_shape: Sequence[int]):
        super().__init__()
        self.sample_fn = sample_fn
        self.image_shape = tuple(image_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        images = self.sample_fn(z.reshape(len(z), *self.image_shape).float())
        if tuple(images.shape) != (len(z), *self.image_shape):
            raise ValueError(f"sample_fn returned {tuple(images.shape)}, expected {(len(z), *self.image_shape)}")
        return as_extractor_input(to_uint8(images))


class FrechetEvaluator:
    """Fréchet distance of samplers against cached reference statistics, with one torch-fidelity extractor."""

    def __init__(self, extractor: str, weights_path: Optional[str], cache_dir: Path, batch_size: int = 64,
                 device="cpu"):
        self.extractor = extractor
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.feature_extractor = build_feature_extractor(extractor, weights_path, self.device)
        self.fingerprint = weights_fingerprint(weights_path)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 1|3, H, W] -> float32 features [N, D] on this evaluator's device, in batches."""
        images = as_extractor_input(images)
        return torch.cat([self.feature_extractor(batch.to(self.device))[0] for batch in images.split(self.batch_size)])

    def reference_statistics(self, population_hash: str,
                             load_images: Callable[[], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of a population, cached as `cache_dir/<extractor>-<population_hash>.npz`.

        `load_images` (-> uint8 [N, C, H, W]) is only called on a miss, or when the cache was made with other
        extractor weights. Ranks may all miss at once: each write is atomic and they write the same numbers.
        """
        path = self.cache_dir / f"{self.extractor}-{population_hash}.npz"
        if path.is_file():
            with np.load(path) as cached:
                if str(cached["weights"]) == self.fingerprint:
                    return cached["mu"], cached["sigma"]
        statistics = fid_features_to_statistics(self.extract(load_images()).cpu())
        buffer = io.BytesIO()
        np.savez(buffer, mu=statistics["mu"], sigma=statistics["sigma"], weights=np.array(self.fingerprint))
        write_atomically(path, buffer.getvalue())
        return statistics["mu"], statistics["sigma"]

    def distance(self, sample_fn: Callable[[torch.Tensor], torch.Tensor], image_shape: Sequence[int],
                 num_samples: int, reference: tuple[np.ndarray, np.ndarray], seed: int = 0, rank: int = 0,
                 world_size: int = 1, gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> float:
        """Fréchet distance between `num_samples` samples of `sample_fn` and `reference` = (mu, sigma).
        Call it on every rank (see sample_features); all return the same value."""
        features, _ = self.sample_features(sample_fn, image_shape, num_samples, seed, rank, world_size, gather)
        return self.frechet(features, reference)

    @staticmethod
    def frechet(features: torch.Tensor, reference: tuple[np.ndarray, np.ndarray]) -> float:
        """Fréchet distance between the statistics of `features` [N, D] and reference = (mu, sigma)."""
        mu, sigma = reference
        statistics = fid_features_to_statistics(features)
        return float(fid_statistics_to_metric(statistics, {"mu": mu, "sigma": sigma}, verbose=False)[KEY_METRIC_FID])

    def sample_features(self, sample_fn: Callable[[torch.Tensor], torch.Tensor], image_shape: Sequence[int],
                        num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                        gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, keep_images: bool = False):
        """(features [num_samples, D], samples or None) of `num_samples` samples of `sample_fn`, in sample
        order, on every rank. With keep_images the samples themselves come back too (uint8
        [num_samples, 3, H, W]), so that other measurements of the same samples need no second pass.

        The sample set is cut into batch-sized chunks dealt round-robin to the ranks, and every rank runs the
        same number of batches (the last ones may be padding, discarded after the gather). So no rank idles at
        the collective while another still samples (an idle rank at an all-gather is a classic source of NCCL
        timeouts), and a sampler whose forward is itself collective (ZeRO-3 gathers parameters) stays in step
        across ranks. `gather(tensor) -> tensor` concatenates the ranks' tensors along dim 0 in rank order
        (accelerator.gather); it is required when world_size > 1. Samples are seeded per chunk, so the result
        does not depend on world_size.
        """
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 for a covariance, got {num_samples}")
        if world_size > 1 and gather is None:
            raise ValueError("sample_features() with world_size > 1 needs gather (e.g. accelerator.gather)")
        generator = SampleGenerator(sample_fn, image_shape)
        b = self.batch_size
        chunks_per_rank = math.ceil(math.ceil(num_samples / b) / world_size)
        local, images = [], []
        with torch.no_grad():
            for j in range(chunks_per_rank):
                latents = chunk_latents(seed, rank + world_size * j, b, image_shape).to(self.device)
                batch = generator(latents)
                local.append(self.extract(batch))
                if keep_images:
                    images.append(batch)
        features = torch.cat(local)
        images = torch.cat(images) if keep_images else None
        if world_size > 1:
            features = gather(features)
            images = gather(images) if keep_images else None
        # Row (r, j, i) of the gathered tensor is item i of chunk r + world_size * j: back to sample order.
        r, j, i = torch.meshgrid(torch.arange(world_size), torch.arange(chunks_per_rank), torch.arange(b),
                                 indexing="ij")
        order = ((r + world_size * j) * b + i).reshape(-1).argsort()[:num_samples]
        return features.cpu()[order], images.cpu()[order] if keep_images else None
