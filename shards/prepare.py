"""`prepare`: draw the populations from the source and write them as WebDataset shards plus a manifest.

Populations are written in drawing order (aux, reference, target), each item decoded once. An item that
does not decode is skipped, and so is an item whose pixels equal those of an item already written to this
data directory (in any population), so no image is in two populations; both are listed in the
population's manifest entry ("skipped"), whose `count` is what was written. More than
data.max_bad_samples undecodable items in one call stop it. Every population keeps the sha256 of each
written item's pixels in a sidecar (<population>/contents.txt, named in its entry with its own sha256),
so a later call that writes only some populations checks the new ones against the others.

A call writes its populations into hidden staging directories and moves them into place only once all
are written; the manifest comes last, atomically, so its presence means the directory is complete, and a
call that fails leaves the data directory as it was. Preparing again is safe: an identical config with
intact files writes nothing; a damaged population is rewritten (the draw is deterministic, and tar members
carry a fixed mtime, so the bytes come out the same); a different config is refused rather than
overwriting data another run may be using. With `shared` (another data directory), a population whose
items, and those of every population drawn before it, are the same there is not written again: its entry
points at the other directory's files (the sweep's runs share the main run's aux and reference shards).
"""
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from shards.errors import DataError, UndecodableItem
from shards.atomic import sha256_file, sha256_text, write_atomically
from shards.manifest import MANIFEST_NAME, MANIFEST_VERSION, load_manifest
from shards.populations import draw_populations, ordered_populations
from shards.sources import open_source
from shards.spec import DataSpec, PopulationSpec

# Populations at least this large get a progress bar; smaller ones finish before a bar is worth drawing.
PROGRESS_MIN_IMAGES = 5000
# Second seed word for the order of images across shards, so it is independent of the class draws.
SHARD_ORDER_STREAM = 1
# A population's content sidecar: one "key sha256-of-its-pixels" line per written item, in shard order.
CONTENTS_NAME = "contents.txt"


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
    # a population's own fields only: the auxiliaries' model keys (pretrained, ...) decide no shard, and leaving
    # them out keeps the fingerprints of runs prepared before those keys existed
    own = {f.name for f in dataclasses.fields(PopulationSpec)}
    populations = [{**{k: v for k, v in plain(pop).items() if k in own}, "role": role}
                   for role, pop in ordered_populations(spec)]
    for pop in populations:
        pop["mixture"] = {str(k): float(v) for k, v in pop["mixture"].items()}
    return sha256_text(canonical_json({
        "source": plain(spec.source),
        "populations": populations,
        "min_shards": spec.min_shards,
        "max_shard_images": spec.max_shard_images,
    }))


def items_hash(source_spec, channels: int, split: str, indices) -> str:
    """Which items a population was drawn: the source (its config, channels resolved), split and indices.
    Two populations with the same items hash hold the same images."""
    return sha256_text(canonical_json({"source": dict(plain(source_spec), channels=channels), "split": split,
                                       "indices": [int(i) for i in indices]}))


def shard_count(count: int, min_shards: int, max_shard_images: int) -> int:
    """At least min_shards (so every rank x worker gets one), at most max_shard_images per shard,
    and never an empty shard."""
    return min(count, max(min_shards, math.ceil(count / max_shard_images)))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, C] image: mode L for one channel, RGB for three."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


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


def read_contents(path: Path) -> dict:
    """{pixels sha256: key} of a content sidecar."""
    return {digest: key for key, digest in (line.split() for line in path.read_text().splitlines())}


class Staging:
    """Where one call writes: hidden directories `.<population>.partial` in data_dir, moved into place
    together by `commit`, or removed by `abandon` with every directory this call created (data_dir itself
    if it did not exist), so a failed call leaves the data directory as it was."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        missing = [d for d in [data_dir, *data_dir.parents] if not d.exists()]
        self.created = missing[-1] if missing else None
        data_dir.mkdir(parents=True, exist_ok=True)
        self.dirs = {}

    def directory(self, name: str) -> Path:
        path = self.data_dir / f".{name}.partial"
        if path.exists():  # left by an interrupted call
            shutil.rmtree(path)
        path.mkdir()
        self.dirs[name] = path
        return path

    def commit(self) -> None:
        for name, path in self.dirs.items():
            final = self.data_dir / name
            if final.exists():  # the damaged population being replaced, or an interrupted call's
                shutil.rmtree(final)
            path.rename(final)

    def abandon(self) -> None:
        for path in [self.created] if self.created else self.dirs.values():
            shutil.rmtree(path, ignore_errors=True)


class PopulationWriter:
    """Writes populations one after another into a Staging, skipping undecodable items (more than
    max_bad_samples of them stop the call) and items whose pixels were already written (`seen`, filled
    also with the contents of the populations this call keeps or shares)."""

    def __init__(self, source, staging: Staging, max_bad_samples: int, log):
        self.source, self.staging, self.max_bad_samples, self.log = source, staging, max_bad_samples, log
        self.seen = {}  # pixels sha256 -> key of the item written with those pixels
        self.bad = []  # (population, key, reason) of the undecodable items met by this call

    def add(self, contents: dict) -> None:
        for digest, key in contents.items():
            self.seen.setdefault(digest, key)

    def write(self, name: str, split: str, indices: np.ndarray, n_shards: int, seed: int) -> tuple:
        """Write the items `indices` of `split` in n_shards shards of (nearly) equal planned size, in a
        seeded shuffled order so every shard holds a fair mix of classes; a shard left empty by skipped
        items is not written. Returns (entry fields, contents {pixels sha256: key})."""
        directory = self.staging.directory(name)
        order = np.random.default_rng([seed, SHARD_ORDER_STREAM]).permutation(indices)
        labels = self.source.labels(split)
        shards, contents, skipped, written = [], {}, [], []
        with tqdm(total=len(order), desc=name, unit="img", disable=len(order) < PROGRESS_MIN_IMAGES) as bar:
            for part in np.array_split(order, n_shards):
                samples = []  # one shard at a time bounds memory for large sources
                for index in part:
                    bar.update()
                    key = sample_key(split, int(index))
                    try:
                        image = self.source.load(split, index)
                    except UndecodableItem as error:
                        self._count_bad(name, key, str(error))
                        skipped.append({"key": key, "reason": str(error)})
                        continue
                    digest = pixels_hash(image)
                    if digest in self.seen:
                        skipped.append({"key": key, "reason": f"duplicate of {self.seen[digest]}"})
                        continue
                    self.seen[digest] = contents[digest] = key
                    samples.append((key, image, labels[index]))
                    written.append(labels[index])
                if samples:
                    entry = write_shard(directory / f"shard-{len(shards):06d}.tar", samples)
                    shards.append(dict(entry, file=f"{name}/{entry['file']}"))
        if not shards:
            raise DataError(f"population '{name}': none of its {len(order)} images could be written; the first "
                            f"skipped: {skipped[0]['key']}: {skipped[0]['reason']}")
        text = "".join(f"{key} {digest}\n" for digest, key in contents.items())
        write_atomically(directory / CONTENTS_NAME, text.encode())
        if skipped:
            self.log(f"warning: population {name}: {len(skipped)} of its {len(order)} images skipped (listed in "
                     f"its manifest entry); the first: {skipped[0]['key']}: {skipped[0]['reason']}")
        histogram = np.bincount(written, minlength=len(self.source.class_names))
        return {
            "count": len(written),
            "class_histogram": {c: int(n) for c, n in zip(self.source.class_names, histogram)},
            "shards": shards,
            "contents": {"file": f"{name}/{CONTENTS_NAME}", "sha256": sha256_file(directory / CONTENTS_NAME)},
            "skipped": skipped,
        }, contents

    def _count_bad(self, name: str, key: str, reason: str) -> None:
        self.bad.append((name, key, reason))
        if len(self.bad) > self.max_bad_samples:
            first_name, first_key, first_reason = self.bad[0]
            raise DataError(f"more than data.max_bad_samples={self.max_bad_samples} source images do not decode; "
                            f"the first: {first_key} of population {first_name}: {first_reason}; nothing was written")


def damaged_files(data_dir: Path, entry: dict) -> list:
    """Descriptions of the population's files (shards, content sidecar) that are missing or whose sha256
    differs."""
    problems = []
    for record in [*entry["shards"], entry["contents"]]:
        path = data_dir / record["file"]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256_file(path) != record["sha256"]:
            problems.append(f"{path} does not match its sha256")
    return problems


def shared_entry(other_dir: Path, other: dict, order: list, items: dict, data_dir: Path):
    """The entry of population order[-1] in `other` (the manifest of other_dir), its files addressed from
    data_dir, if the same populations were drawn there up to it (same names in the same order, same items
    hashes) and its files are intact; else None. The same items after the same populations are the same
    images, with the same duplicates skipped."""
    populations = other["populations"]
    if other.get("order", [])[:len(order)] != order or \
            any(populations[name].get("items") != items[name] for name in order):
        return None
    entry = populations[order[-1]]
    if damaged_files(other_dir, entry):
        return None

    def moved(record):
        path = os.path.relpath(other_dir.resolve() / record["file"], data_dir.resolve())
        return dict(record, file=Path(path).as_posix())

    return dict(entry, shards=[moved(shard) for shard in entry["shards"]], contents=moved(entry["contents"]))


def content_overlaps(contents: dict) -> dict:
    """{"a&b": number of images with the same pixels} for every pair of populations that share any."""
    overlaps = {}
    for (name_a, hashes_a), (name_b, hashes_b) in combinations(contents.items(), 2):
        shared = len(hashes_a.keys() & hashes_b.keys())
        if shared:
            overlaps[f"{name_a}&{name_b}"] = shared
    return overlaps


def population_hash(entry: dict) -> str:
    """Content hash of a population entry (shard and sidecar hashes included, not where the files are, so a
    population shared by two data directories hashes the same in both): a cache key for evaluation."""
    def unplaced(record):
        return {k: v for k, v in record.items() if k != "file"}

    content = dict({k: v for k, v in entry.items() if k != "hash"},
                   shards=[unplaced(shard) for shard in entry["shards"]], contents=unplaced(entry["contents"]))
    return sha256_text(canonical_json(content))


def write_manifest(data_dir: Path, manifest: dict) -> None:
    write_atomically(Path(data_dir) / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def prepare(spec: DataSpec, data_dir, log=print, shared=None) -> dict:
    """Make `data_dir` hold the populations of `spec` as shards plus manifest.json; returns the manifest.

    `shared`: another prepared data directory whose identical populations are used in place (see the
    module docstring). Raises DataError, before writing anything, for a bad config or source, for a data_dir
    prepared from a different data config and for a `shared` without a manifest; and, leaving data_dir as
    it was, past data.max_bad_samples undecodable images or for a population none of whose images can be
    written.
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
            problems = damaged_files(data_dir, entry)
            if problems:
                damaged[name] = problems
        if not damaged:
            log(f"shards up to date in {data_dir}")
            return existing
    other_dir = None if shared is None else Path(shared)
    other = None if shared is None else load_manifest(other_dir)
    source = open_source(spec.source)
    native = source.native_size()
    if native is not None and spec.source.image_size > native:
        log(f"note: data.source.image_size={spec.source.image_size} upsamples the source's {native}x{native} images; "
            f"a likelihood per dimension then mostly measures how a model interpolates (image_size={native} measures "
            "the images themselves)")
    pops = ordered_populations(spec)
    drawn = draw_populations(source, pops)  # validates every population before anything is written
    items = {name: items_hash(spec.source, source.channels, split, indices)
             for name, (split, indices) in drawn.items()}
    order = [pop.name for _, pop in pops]
    staging = Staging(data_dir)
    writer = PopulationWriter(source, staging, spec.max_bad_samples, log)
    populations, contents = {}, {}
    try:
        for position, (role, pop) in enumerate(pops):
            split, indices = drawn[pop.name]
            ours = {"role": role, "split": split, "items": items[pop.name],
                    "mixture": {str(k): float(v) for k, v in dict(pop.mixture).items()}}
            if pop.name in damaged:
                log(f"population {pop.name}: {'; '.join(damaged[pop.name])}; rewriting it")
            if existing is not None and pop.name not in damaged:
                entry = existing["populations"][pop.name]
            elif other is not None and (found := shared_entry(other_dir, other, order[:position + 1], items,
                                                              data_dir)) is not None:
                log(f"population {pop.name} ({role}): {found['count']} images shared with {other_dir}")
                entry = dict(found, **ours)
            else:
                n_shards = shard_count(len(indices), spec.min_shards, spec.max_shard_images)
                log(f"population {pop.name} ({role}): {len(indices)} images from '{split}' in {n_shards} shards")
                written, contents[pop.name] = writer.write(pop.name, split, indices, n_shards, pop.seed)
                entry = dict(ours, **written)
            if pop.name not in contents:  # kept or shared: its contents are written already
                contents[pop.name] = read_contents(data_dir / entry["contents"]["file"])
                writer.add(contents[pop.name])
            entry["hash"] = population_hash(entry)
            populations[pop.name] = entry
        staging.commit()
    except BaseException:
        staging.abandon()
        raise
    overlaps = content_overlaps(contents)
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "image_size": spec.source.image_size,
        "native_size": native,
        "channels": source.channels,
        "class_names": list(source.class_names),
        "order": order,
        "disjoint": not overlaps,
        "overlaps": overlaps,
        "populations": populations,
    }
    write_manifest(data_dir, manifest)
    log(f"wrote {data_dir / MANIFEST_NAME}")
    return manifest
