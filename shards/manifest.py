"""Reading the manifest that `prepare` writes last into a data directory.

The manifest is the only index of a data directory: readers take shard files, per-shard counts, image
shape and class names from it and never list directories, so a half-written directory (no manifest yet)
is never read.

What `prepare` records: version, fingerprint (of the data config), image_size, channels, class_names,
order (the populations in drawing order), disjoint and overlaps (whether, and which, populations share
image content) and populations: {name: {role, split, mixture, items (hash of the source, split and item
indices drawn), count (images written), class_histogram (of those), skipped ([{key, reason}]: undecodable
or duplicate images), shards ([{file, count, sha256}]), contents ({file, sha256}: the sidecar of the
written images' pixel hashes), hash}}. Every `file` is relative to the data directory and may lead into
another one, whose identical population this one shares.
"""
import json
from pathlib import Path

from shards.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def load_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"no {MANIFEST_NAME} in {data_dir}: run `scorefuse prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path} is not a version-{MANIFEST_VERSION} scorefuse manifest; "
                        f"run `scorefuse prepare` on a fresh data directory")
    return manifest


def population_entry(manifest: dict, name: str) -> dict:
    populations = manifest["populations"]
    if name not in populations:
        raise DataError(f"unknown population '{name}'; the data directory has: {', '.join(populations)}")
    return populations[name]


def shard_paths(data_dir, manifest: dict, population: str) -> list:
    """Paths of the population's shards (data_dir joined with each `file`), in manifest order."""
    return [str(Path(data_dir) / shard["file"]) for shard in population_entry(manifest, population)["shards"]]


def image_shape(manifest: dict) -> tuple[int, int, int]:
    """(C, H, W) of the images a manifest (or a model's model.json) describes."""
    return manifest["channels"], manifest["image_size"], manifest["image_size"]
