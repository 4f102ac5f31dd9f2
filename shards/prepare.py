"""`prepare`: draw the populations from the source and write them as WebDataset shards plus a manifest.

The manifest is written last, atomically, so its presence means the directory is complete. Preparing
again is safe: an identical config with intact shards writes nothing; a damaged population is rewritten
(the draw is deterministic, and tar members carry a fixed mtime, so the bytes come out the same); a
different config is refused rather than overwriting data another run may be using.
"""
import dataclasses
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from shards.errors import DataError
from shards.atomic import sha256_file, sha256_text, write_atomically
from shards.manifest import MANIFEST_NAME, MANIFEST_VERSION, load_manifest
from shards.populations import draw_populations, find_overlaps, ordered_populations
from shards.sources import open_source
from shards.spec import DataSpec

# Populations at least this large get a progress bar; smaller ones finish before a bar is worth drawing.
PROGRESS_MIN_IMAGES = 5000
# Second seed word for the order of images across shards, so it is independent of the class draws.
SHARD_ORDER_STREAM = 1


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def plain(node):
    """A dataclass or OmegaConf node as plain dicts/lists, for hashing."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dataclasses.asdict(node)


def data_fingerprint(spec: DataSpec) -> str:
    """Hash of everything that decides the shards' content. Reader settings (workers, max_bad_samples)
    are left out: changing them must not invalidate prepared data."""
    populations = [dict(plain(pop), role=role) for role, pop in ordered_populations(spec)]
    for pop in populations:
        pop["mixture"] = {str(k): float(v) for k, v in pop["mixture"].items()}
    return sha256_text(canonical_json({
        "source": plain(spec.source),
        "populations": populations,
        "min_shards": spec.min_shards,
        "max_shard_images": spec.max_shard_images,
    }))


def shard_count(count: int, min_shards: int, max_shard_images: int) -> int:
    """At least min_shards (so every rank x worker gets one), at most max_shard_images per shard,
    and never an empty shard."""
    return min(count, max(min_shards, math.ceil(count / max_shard_images)))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, C] image: mode L for one channel, RGB for three."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_key(split: str, source_index: int) -> str:
    return f"{split}-{source_index:07d}"


def write_shard(path: Path, samples) -> dict:
    """Write (key, uint8 [H, W, C] image, int label) samples as one tar shard, atomically; returns its
    manifest entry without the directory part of `file`."""
    temporary = path.with_name(path.name + ".tmp")
    count = 0
    with open(temporary, "wb") as handle:
        # mtime=0: the same samples give the same bytes, hence the same sha256 and population hash.
        with wds.TarWriter(handle, mtime=0) as writer:
            for key, image, label in samples:
                writer.write({"__key__": key, "png": encode_png(image), "cls": str(int(label))})
                count += 1
    os.replace(temporary, path)
    return {"file": path.name, "count": count, "sha256": sha256_file(path)}


def write_population(directory: Path, source, split: str, indices: np.ndarray, n_shards: int, seed: int,
                     desc: str) -> list:
    """Write the items `indices` of `split` as n_shards shards of (nearly) equal size, in a seeded
    shuffled order so every shard holds a fair mix of classes. Returns the shard entries."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("shard-*.tar*"):  # left by an interrupted or damaged earlier write
        stale.unlink()
    order = np.random.default_rng([seed, SHARD_ORDER_STREAM]).permutation(indices)
    labels = source.labels(split)
    entries = []
    with tqdm(total=len(indices), desc=desc, unit="img", disable=len(indices) < PROGRESS_MIN_IMAGES) as bar:
        for number, part in enumerate(np.array_split(order, n_shards)):
            images = source.load(split, part)  # one shard at a time bounds memory for large sources
            samples = ((sample_key(split, int(i)), image, labels[i]) for i, image in zip(part, images))
            entry = write_shard(directory / f"shard-{number:06d}.tar", samples)
            entries.append(dict(entry, file=f"{directory.name}/{entry['file']}"))
            bar.update(len(part))
    return entries


def damaged_shards(data_dir: Path, entry: dict) -> list:
    """Descriptions of the population's shards that are missing or whose sha256 differs."""
    problems = []
    for shard in entry["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256_file(path) != shard["sha256"]:
            problems.append(f"{path} does not match its sha256")
    return problems


def population_hash(entry: dict) -> str:
    """Content hash of a population entry (shard hashes included): a cache key for evaluation."""
    return sha256_text(canonical_json({k: v for k, v in entry.items() if k != "hash"}))


def write_manifest(data_dir: Path, manifest: dict) -> None:
    write_atomically(Path(data_dir) / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def prepare(spec: DataSpec, data_dir, log=print) -> dict:
    """Make `data_dir` hold the populations of `spec` as shards plus manifest.json; returns the manifest.

    Raises DataError, before writing anything, for a bad config or source, and for a data_dir prepared
    from a different data config.
    """
    data_dir = Path(data_dir)
    fingerprint = data_fingerprint(spec)
    if spec.min_shards < 1 or spec.max_shard_images < 1:
        raise DataError("data.min_shards and data.max_shard_images must be at least 1")
    damaged = {}
    existing = None
    if (data_dir / MANIFEST_NAME).exists():
        existing = load_manifest(data_dir)
        if existing.get("fingerprint") != fingerprint:
            raise DataError(f"{data_dir} was prepared from a different data config; use another data "
                            f"directory or delete this one (nothing was overwritten)")
        for name, entry in existing["populations"].items():
            problems = damaged_shards(data_dir, entry)
            if problems:
                damaged[name] = problems
        if not damaged:
            log(f"shards up to date in {data_dir}")
            return existing
    source = open_source(spec.source)
    pops = ordered_populations(spec)
    drawn = draw_populations(source, pops)  # validates every population before anything is written
    overlaps = find_overlaps(drawn)
    data_dir.mkdir(parents=True, exist_ok=True)
    populations = {}
    for role, pop in pops:
        if existing is not None and pop.name not in damaged:
            populations[pop.name] = existing["populations"][pop.name]
            continue
        if pop.name in damaged:
            log(f"population {pop.name}: {'; '.join(damaged[pop.name])}; rewriting it")
        split, indices = drawn[pop.name]
        n_shards = shard_count(len(indices), spec.min_shards, spec.max_shard_images)
        log(f"population {pop.name} ({role}): {len(indices)} images from '{split}' in {n_shards} shards")
        shards = write_population(data_dir / pop.name, source, split, indices, n_shards, pop.seed, pop.name)
        counts = np.bincount(source.labels(split)[indices], minlength=len(source.class_names))
        entry = {
            "role": role,
            "split": split,
            "count": int(len(indices)),
            "mixture": {str(k): float(v) for k, v in dict(pop.mixture).items()},
            "class_histogram": {name: int(n) for name, n in zip(source.class_names, counts)},
            "shards": shards,
        }
        entry["hash"] = population_hash(entry)
        populations[pop.name] = entry
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "image_size": spec.source.image_size,
        "channels": source.channels,
        "class_names": list(source.class_names),
        "disjoint": not overlaps,
        "overlaps": overlaps,
        "populations": populations,
    }
    write_manifest(data_dir, manifest)
    log(f"wrote {data_dir / MANIFEST_NAME}")
    return manifest
