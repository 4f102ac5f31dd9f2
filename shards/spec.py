"""Typed description of the data side of a run: where images come from and how populations are cut.

These dataclasses are the `data:` section of the run config (OmegaConf structured config), so a
misspelt key or a wrong type fails when the config is loaded, before anything is read or written.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING

from shards.ranges import choice, positive, zero_or_more


@dataclass
class SourceSpec:
    """Where the images come from.

    kind: digits (sklearn's embedded 8x8 digits) | cifar10 (the python tarball at `path`) |
          lsun (a directory at `path` holding one `<category>_train_lmdb` per entry of `categories`) |
          folder (a directory at `path` with one sub-directory per class).
    image_size: images are resized (area/bicubic) to image_size x image_size.
    channels: auto (digits and all-grey folders 1, the rest 3) | 1 | 3 (forced: grey is replicated into
          RGB, colour becomes PIL's luma).
    """
    kind: str = choice("digits", "cifar10", "lsun", "folder")
    path: Optional[str] = None
    image_size: int = positive(16)
    channels: str = choice("auto", "1", "3")
    categories: List[str] = field(default_factory=list)


@dataclass
class PopulationSpec:
    """A population: `count` images drawn without replacement with the class `mixture`
    (class name -> proportion, summing to 1) from the source's `split`, using `seed`."""
    name: str = MISSING
    mixture: Dict[str, float] = MISSING
    count: int = MISSING
    seed: int = zero_or_more(0)
    split: str = choice("train", "test")


@dataclass
class AuxSpec(PopulationSpec):
    """An auxiliary: a population to train a model on (mixture, count, seed, split), or a model that exists
    already (`pretrained`), which has no population and no shards.

    pretrained: a diffusers model (a directory written by save_pretrained, a pipeline's or the model's own, or
        a hub id "owner/name" with `revision` and `subfolder`), or a scorefuse export (the directory holding
        ema.safetensors and model.json, or that .safetensors file).
    timesteps: how a diffusers model's timestep follows from sigma: interpolate (in ln sigma between its
        table's entries) | round (the nearest entry).
    """
    mixture: Dict[str, float] = field(default_factory=dict)
    count: int = 0
    pretrained: Optional[str] = None
    revision: Optional[str] = None
    subfolder: Optional[str] = None
    timesteps: str = choice("interpolate", "round")


@dataclass
class DataSpec:
    source: SourceSpec = field(default_factory=SourceSpec)
    aux: List[AuxSpec] = field(default_factory=list)
    target: PopulationSpec = field(default_factory=PopulationSpec)
    reference: PopulationSpec = field(default_factory=PopulationSpec)
    # Shards per population: at least min_shards (>= nodes x GPUs x workers, so no reader starves)
    # and at most max_shard_images images per shard.
    min_shards: int = positive(8)
    max_shard_images: int = positive(2000)
    # DataLoader worker processes per rank for the training stream.
    workers: int = zero_or_more(2)
    # Undecodable source items one prepare skips, and distinct corrupt shard samples one reader skips,
    # before it stops.
    max_bad_samples: int = zero_or_more(10)
