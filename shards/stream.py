"""The two ways shards are read: an endless resumable training stream, and a read-once evaluation pass.

Training (TrainStream) is a resampled stream that is a pure function of (seed, rank, worker, position):
every (rank, worker) pair walks its own infinite sequence of "visits", visit j picking a shard uniformly
at random with an RNG seeded by (seed, rank, worker, j) and emitting that shard's samples in an order
drawn from the same RNG. A resumed run passes the number of batches it already consumed and sees
exactly the batches an uninterrupted run would have seen next; the skipped visits are walked with the
manifest's per-shard counts, without reading them.

Evaluation (population_batches, read_population) goes through a population exactly once, in shard order.

Both count corrupt data with BadSampleCounter: a bad sample is skipped with one warning, and the reader
stops with a DataError once it has met more than `max_bad_samples` distinct bad samples. The training
stream visits every shard again and again; a bad sample counts once, however often it is met.
"""
import io
import math
import signal
import sys
from itertools import count as count_from, islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from shards.errors import DataError
from shards.manifest import load_manifest, population_entry, shard_paths
from shards.pixels import to_unit

READ_BATCH = 1024  # images decoded at a time by read_population


class BadSampleCounter:
    """Counts the distinct bad samples, (file, key) pairs, one reader process met in one population: an
    undecodable sample is its own pair, a corrupt or short shard one pair (key "unknown") for the file.

    The count is per process: with a DataLoader each worker holds its own copy, so a population may hold
    up to workers x max_bad_samples bad samples before every reader of it has stopped.
    """

    def __init__(self, population: str, max_bad_samples: int):
        self.population = population
        self.max_bad_samples = max_bad_samples
        self.bad = set()  # (file, key) of every bad sample met
        self.first = None

    @property
    def count(self) -> int:
        return len(self.bad)

    def record(self, file, key, reason) -> None:
        if (file, key) in self.bad:
            return
        self.bad.add((file, key))
        if self.first is None:
            self.first = f"key {key} in file {file}: {reason}"
            print(f"warning: skipping corrupt data in population {self.population}: {self.first}",
                  file=sys.stderr, flush=True)
        if self.count > self.max_bad_samples:
            raise DataError(f"more than {self.max_bad_samples} corrupt samples in population "
                            f"{self.population}; first: {self.first}")


def decode_sample(sample: dict, channels: int, image_size: int):
    """(uint8 [C, H, W] image, int label) of a shard sample; raises if it is not what prepare wrote."""
    with Image.open(io.BytesIO(sample["png"])) as image:
        image.load()
        expected_mode = "L" if channels == 1 else "RGB"
        if image.mode != expected_mode or image.size != (image_size, image_size):
            raise ValueError(f"expected a {image_size}x{image_size} {expected_mode} image, "
                             f"got {image.size[0]}x{image.size[1]} {image.mode}")
        array = np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)
    return array.transpose(2, 0, 1), int(sample["cls"])


def decode_or_record(sample: dict, counter: BadSampleCounter, channels: int, image_size: int):
    """decode_sample, or None after recording the sample as bad."""
    try:
        return decode_sample(sample, channels, image_size)
    except Exception as error:  # PIL signals bad data with many exception types
        counter.record(sample.get("__url__", "unknown"), sample.get("__key__", "unknown"),
                       f"{type(error).__name__}: {error}")
        return None


def shard_samples(path: str, expected_count: int, counter: BadSampleCounter):
    """The raw samples (dicts of bytes) of one shard, streamed.

    A tar error ends the shard and is recorded once; so is a shard shorter than the manifest says (a tar
    cut at a member boundary reads as a clean end). A sample missing its png or cls member (cut short)
    is left out and covered by that one record instead of being counted again by the decoder.
    """
    errors = []

    def stop_shard(error):
        errors.append(error)
        return False  # tells webdataset to stop reading this shard rather than retry past the damage

    found = 0
    for sample in tarfile_samples([{"url": path}], handler=stop_shard):
        if not {"png", "cls"} <= sample.keys():
            continue
        found += 1
        yield sample
    if errors:
        # webdataset appends " @ <stream>" and the url to the message; keep the reason only.
        reason = str(errors[0].args[0]).split(" @ ")[0] if errors[0].args else ""
        counter.record(path, "unknown", f"{type(errors[0]).__name__}: {reason}")
    elif found < expected_count:
        counter.record(path, "unknown", f"the shard holds {found} of its {expected_count} samples")


class PopulationShards:
    """What a reader needs from the manifest about one population: shard paths, counts, image shape."""

    def __init__(self, data_dir, population: str):
        manifest = load_manifest(data_dir)
        self.population = population
        self.paths = shard_paths(data_dir, manifest, population)
        self.counts = [shard["count"] for shard in population_entry(manifest, population)["shards"]]
        self.channels = manifest["channels"]
        self.image_size = manifest["image_size"]
        missing = [path for path in self.paths if not Path(path).is_file()]
        if missing:
            raise DataError(f"population {population}: shard {missing[0]} is missing "
                            f"({len(missing)} missing); run `scorefuse prepare` again to rewrite it")


class TrainStream(IterableDataset):
    """Endless batches (float32 [B, C, H, W] in [-1, 1], int64 labels [B]) of one population for one rank.

    With a DataLoader of W workers (in order), the rank's global batch k comes from stream role k % W.
    `start_batch` is the number of batches this rank already consumed: loader worker d plays role
    (d + start_batch) % W, and each role first skips the batches it produced before start_batch, so the
    resumed loader continues exactly where the uninterrupted one was. The stream depends on
    (seed, rank, num_workers, batch_size) but not on world_size. Resumption is exact while no sample is
    bad; a skipped bad sample shifts the batches cut after it.
    """

    def __init__(self, data_dir, population, batch_size, seed, rank, world_size, num_workers,
                 start_batch=0, max_bad_samples=10):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.shards = PopulationShards(data_dir, population)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.start_batch = start_batch
        self.max_bad_samples = max_bad_samples

    def __iter__(self):
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(1, self.num_workers):
            raise ValueError(f"TrainStream made for {self.num_workers} workers runs under {workers}; "
                             f"its resume arithmetic needs the real number")
        role = (loader_worker + self.start_batch) % workers
        skip_batches = max(0, math.ceil((self.start_batch - role) / workers))
        counter = BadSampleCounter(self.shards.population, self.max_bad_samples)
        samples = self._samples(role, skip_batches * self.batch_size, counter)
        while True:
            batch = list(islice(samples, self.batch_size))
            images = to_unit(torch.from_numpy(np.stack([image for image, _ in batch])))
            labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
            yield images, labels

    def _samples(self, role: int, skip: int, counter: BadSampleCounter):
        """The endless decoded sample sequence of one role, starting `skip` samples in."""
        for visit in count_from():
            rng = np.random.default_rng([self.seed, self.rank, role, visit])
            shard = int(rng.integers(len(self.shards.paths)))
            expected = self.shards.counts[shard]
            if skip >= expected:  # the whole visit was consumed before the resume point: do not read it
                skip -= expected
                continue
            raw = list(shard_samples(self.shards.paths[shard], expected, counter))
            for index in rng.permutation(len(raw))[skip:]:
                decoded = decode_or_record(raw[index], counter, self.shards.channels, self.shards.image_size)
                if decoded is not None:
                    yield decoded
            skip = 0


def train_loader(data_dir, population, batch_size, seed, rank, world_size, num_workers, start_batch=0,
                 max_bad_samples=10, pin_memory=False) -> DataLoader:
    """A DataLoader over a TrainStream; batches are made inside the workers (batch_size=None here).
    pin_memory for a GPU consumer, so that its non_blocking copies really overlap."""
    stream = TrainStream(data_dir, population, batch_size, seed, rank, world_size, num_workers,
                         start_batch=start_batch, max_bad_samples=max_bad_samples)
    # The stream is seeded by itself; a private generator keeps the DataLoader from drawing its base
    # seed from the global RNG, which would make the training noise depend on when the loader started.
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory,
                      worker_init_fn=_leave_interrupts_to_the_trainer)


def _leave_interrupts_to_the_trainer(_worker_id: int) -> None:
    """Ctrl-C reaches the workers too; they ignore it and the training process checkpoints (a worker killed
    by it would end the run with 'worker exited unexpectedly' instead)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def population_batches(data_dir, population, batch_size, max_bad_samples=10, rank=0, world_size=1):
    """One pass over a population in shard order, cut into batches of `batch_size` samples (the last one may be
    smaller): (batch index, uint8 images [B, C, H, W], int64 labels [B]) of the batches whose index % world_size
    is `rank`. Every shard is read once and streamed, so memory holds one batch, whatever the population's size;
    the samples of other ranks' batches are read past without being decoded. A corrupt sample leaves its batch
    one image short (the batches are cut by position in the shards, the same on every rank)."""
    shards = PopulationShards(data_dir, population)
    counter = BadSampleCounter(population, max_bad_samples)
    shape = (0, shards.channels, shards.image_size, shards.image_size)
    samples = (sample for path, expected in zip(shards.paths, shards.counts)
               for sample in shard_samples(path, expected, counter))
    for index in count_from():
        raw = list(islice(samples, batch_size))
        if not raw:
            return
        if index % world_size != rank:
            continue
        decoded = [d for d in (decode_or_record(sample, counter, shards.channels, shards.image_size)
                               for sample in raw) if d is not None]
        images = np.stack([image for image, _ in decoded]) if decoded else np.zeros(shape, np.uint8)
        yield index, torch.from_numpy(images), torch.tensor([label for _, label in decoded], dtype=torch.int64)


def read_population(data_dir, population, max_bad_samples=10):
    """The whole population in shard order, in this process: (uint8 [N, C, H, W], int64 labels [N]).
    For populations that fit in memory (FID reference statistics, a classifier's training data); a pass that
    need not hold them reads population_batches."""
    parts = list(population_batches(data_dir, population, READ_BATCH, max_bad_samples))
    if not parts:  # no shard could be read (and no more of them than max_bad_samples)
        shards = PopulationShards(data_dir, population)
        return (torch.zeros((0, shards.channels, shards.image_size, shards.image_size), dtype=torch.uint8),
                torch.zeros(0, dtype=torch.int64))
    return torch.cat([images for _, images, _ in parts]), torch.cat([labels for _, _, labels in parts])
