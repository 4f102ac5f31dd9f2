"""Feature spaces for comparing samples with real images, through torch-fidelity, on any number of ranks.

Two feature extractors: "inception" is torch-fidelity's `inception-v3-compat` at its 2048-d pool layer, i.e.
the standard FID of the papers (docs/METHODS.md §3); "classifier" is the small CNN of evaluation/classifier.py,
trained on the run's own labels, an offline feature space for any labelled source. The extractor is built by
torch-fidelity's own factory and the Fréchet distance by its own statistics functions, so the numbers are
torch-fidelity's; this module adds sampling our models with per-image seeds, the reference cache and the
spreading of the work over ranks.
"""
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import nn
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import create_feature_extractor

from evaluation.classifier import EXTRACTOR_NAME as CLASSIFIER  # importing it registers it
from shards.atomic import sha256_file, write_atomically
from shards.errors import ConfigError
from shards.pixels import to_uint8
from evaluation.spec import INCEPTION_FILE
from shards.seeds import Stream, per_image_normal

INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


@dataclass(frozen=True)
class Extractor:
    registry_name: str  # the name torch-fidelity's registry knows
    feature: str        # the feature layer the distance is computed on
    metric_prefix: str  # fid for Inception; anything else must not be called FID


EXTRACTORS = {
    "inception": Extractor("inception-v3-compat", "2048", "fid"),
    "classifier": Extractor(CLASSIFIER, "features", "fd_clf"),
}


def resolve_extractor(name: str) -> Extractor:
    if name not in EXTRACTORS:
        raise ConfigError(f"unknown feature extractor {name!r} (eval.extractor): use one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name]


def metric_name(extractor: str, num_samples: int) -> str:
    """fid50k, fid2k, fid64, fd_clf1k: a metric is named by its sample count, since fid10k is not fid50k."""
    count = f"{num_samples // 1000}k" if num_samples % 1000 == 0 else str(num_samples)
    return resolve_extractor(extractor).metric_prefix + count


def build_feature_extractor(extractor: str, weights_path: Optional[str], device) -> nn.Module:
    """torch-fidelity's extractor with local weights; every loading failure becomes one ConfigError."""
    choice = resolve_extractor(extractor)
    if weights_path is not None and not Path(weights_path).is_file():
        raise ConfigError(f"{extractor} weights not found: {weights_path}")
    try:
        module = create_feature_extractor(choice.registry_name, [choice.feature], cuda=False,
                                          feature_extractor_weights_path=weights_path, verbose=False)
    except ConfigError:
        raise
    except Exception as error:  # download failure (URLError), wrong shapes (RuntimeError), not a checkpoint...
        if weights_path is None:
            raise ConfigError(
                f"could not load the Inception weights ({error}); set eval.inception_weights to a local copy of "
                f"{INCEPTION_FILE} (the file torch-fidelity downloads from {INCEPTION_URL})") from error
        raise ConfigError(f"could not load {extractor} weights from {weights_path}: {error}") from error
    return module.to(device)


def weights_fingerprint(weights_path: Optional[str]) -> str:
    """sha256 of the weights file: cached reference features are only valid for the weights that made them."""
    if weights_path is None:
        return "torch-fidelity-default"
    return sha256_file(weights_path)


def as_extractor_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 1|3, H, W] -> uint8 [B, 3, H, W], torch-fidelity's input convention (grey replicated)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [B, 1|3, H, W], got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def frechet(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between the Gaussian statistics of two feature sets [N, D] and [M, D]."""
    a, b = fid_features_to_statistics(features.cpu()), fid_features_to_statistics(reference.cpu())
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def frechet_float64(features: torch.Tensor, reference: torch.Tensor) -> float:
    """frechet in float64 torch on the features' device, for an accelerator: tr sqrt(S1 S2) as the trace of the
    square root of the symmetric sqrt(S2) S1 sqrt(S2), which has the same eigenvalues, so two symmetric
    eigendecompositions (fast on a GPU) replace torch-fidelity's general eig, which at D = 2048 takes seconds
    of a CPU core. Both clip the eigenvalues that rounding makes negative to 0. It differs from frechet by at
    most 1e-7 of tr S1 + tr S2 (tests/test_intervals.py; torch-fidelity's means are float32)."""
    a, b = features.to(torch.float64), reference.to(torch.float64)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_b)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    tr_covmean = torch.linalg.eigvalsh(root @ cov_a @ root).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean)


@dataclass
class Ranks:
    """How work is spread: this process's rank, the world size, and the collectives (accelerator.gather,
    accelerator.wait_for_everyone, accelerate's gather_object: every rank's list, concatenated in rank order);
    one process needs none."""
    rank: int = 0
    world: int = 1
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    barrier: Callable[[], None] = lambda: None
    gather_objects: Optional[Callable[[list], list]] = None

    @classmethod
    def of(cls, accelerator) -> "Ranks":
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.gather,
                   accelerator.wait_for_everyone, gather_object)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def map(self, fn: Callable[[Any], Any], items: Sequence) -> list:
        """[fn(item) for item in items] on every rank, the items dealt round-robin: in each round every rank
        computes at most one item, then all exchange the round's results. So no rank waits at a collective
        longer than the slowest single item takes, however many items there are: that bound, not the whole
        share of a rank, is what must stay below the process group's timeout. Results are picklable (CPU)."""
        if self.world == 1:
            return [fn(item) for item in items]
        if self.gather_objects is None:
            raise ValueError("spreading work over several ranks needs Ranks.gather_objects")
        results = []
        for start in range(0, len(items), self.world):
            mine = start + self.rank
            results += self.gather_objects([fn(items[mine])] if mine < len(items) else [])
        return results


class FeatureSpace:
    """One torch-fidelity feature extractor: features of images, cached features of reference populations,
    and the features of a sampler's images computed over all ranks."""

    def __init__(self, extractor: str, weights_path: Optional[str], cache_dir: Path, batch_size: int = 64,
                 device="cpu", ranks: Ranks = Ranks(), sample_batch: int = 64):
        self.extractor = extractor
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.sample_batch = sample_batch
        self.device = torch.device(device)
        self.ranks = ranks
        self.module = build_feature_extractor(extractor, weights_path, self.device)
        self.fingerprint = weights_fingerprint(weights_path)

    def metric(self, num_samples: int) -> str:
        return metric_name(self.extractor, num_samples)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 1|3, H, W] -> float32 features [N, D] on the CPU, in batches on this space's device."""
        images = as_extractor_input(images)
        if len(images) == 0:
            return torch.zeros(0, 0)
        return torch.cat([self.module(batch.to(self.device))[0].cpu() for batch in images.split(self.batch_size)])

    def reference(self, population_hash: str, load_images: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Features [N, D] of a population, cached as `cache_dir/<extractor>-<population_hash>.npz`.

        `load_images` (-> uint8 [N, C, H, W]) is called only on a miss, or when the cache was made with other
        extractor weights, and only on the main process; the others wait and read the file it writes."""
        path = self.cache_dir / f"{self.extractor}-{population_hash}.npz"
        if self.ranks.main and self._cached(path) is None:
            buffer = io.BytesIO()
            np.savez(buffer, features=self.extract(load_images()).numpy(), weights=np.array(self.fingerprint))
            write_atomically(path, buffer.getvalue())
        self.ranks.barrier()
        return self._cached(path)

    def _cached(self, path: Path) -> torch.Tensor | None:
        if not path.is_file():
            return None
        with np.load(path) as cached:
            if str(cached["weights"]) != self.fingerprint:
                return None
            return torch.from_numpy(cached["features"])

    def sample(self, sample_fn: Callable[[torch.Tensor], torch.Tensor], image_shape: Sequence[int],
               num_samples: int, seed: int = 0, keep_images: bool = False):
        """(features [num_samples, D], uint8 images [num_samples, C, H, W] or None) of `num_samples` samples of
        `sample_fn` (latents [B, C, H, W] -> images in [-1, 1]), in sample order, on every rank.

        Image i has the latents of shards.seeds Stream.SAMPLES and index i and is computed in the aligned group
        i // sample_batch, so it does not depend on the world size. The groups are dealt round-robin to the
        ranks, and every rank runs the same number of them (the last ones may be padding, discarded after the
        gather): no rank idles at the collective while another still samples (an idle rank at an all-gather
        is a classic source of NCCL timeouts), and a sampler whose forward is itself collective (ZeRO-3
        gathers parameters) stays in step across ranks.
        """
        rank, world, b = self.ranks.rank, self.ranks.world, self.sample_batch
        if world > 1 and self.ranks.gather is None:
            raise ValueError("sampling features over several ranks needs Ranks.gather")
        chunks_per_rank = math.ceil(math.ceil(num_samples / b) / world)
        features, images = [], []
        with torch.no_grad():
            for j in range(chunks_per_rank):
                chunk = rank + world * j
                latents = per_image_normal(seed, Stream.SAMPLES, range(chunk * b, (chunk + 1) * b), image_shape)
                batch = to_uint8(sample_fn(latents.to(self.device)))
                features.append(self.extract(batch).to(self.device))
                if keep_images:
                    images.append(batch)
        features = torch.cat(features)
        images = torch.cat(images) if keep_images else None
        if world > 1:
            features = self.ranks.gather(features)
            images = self.ranks.gather(images) if keep_images else None
        # Row (r, j, i) of the gathered tensor is item i of chunk r + world * j: back to sample order.
        r, j, i = torch.meshgrid(torch.arange(world), torch.arange(chunks_per_rank), torch.arange(b), indexing="ij")
        order = ((r + world * j) * b + i).reshape(-1).argsort()[:num_samples]
        return features.cpu()[order], images.cpu()[order] if keep_images else None
