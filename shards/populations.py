"""Cutting populations out of a source: exact class counts, seeded draws, no image shared between two.

Populations are drawn in a fixed priority order (auxiliary ones in config order, then target, then
reference); each draws only from images no earlier population took. Everything is validated here, before
prepare writes a byte, so a bad mixture never leaves half a data directory behind.
"""
import math
import re
from itertools import combinations

import numpy as np

from shards.errors import DataError
from shards.sources import Source
from shards.spec import DataSpec, PopulationSpec

MIXTURE_TOLERANCE = 1e-6
# A population name becomes a directory name, so keep it to one plain path component.
POPULATION_NAME = re.compile(r"[A-Za-z0-9_-]+")


def ordered_populations(spec: DataSpec) -> list:
    """[(role, PopulationSpec)] in drawing priority: aux in order, then target, then reference."""
    return [("aux", pop) for pop in spec.aux] + [("target", spec.target), ("reference", spec.reference)]


def allocate_counts(count: int, proportions: np.ndarray) -> np.ndarray:
    """Split `count` into integer parts proportional to `proportions` (summing to 1), largest remainder
    first, so the parts sum to exactly `count`. Ties go to the earlier class."""
    quotas = count * np.asarray(proportions, dtype=np.float64)
    counts = np.floor(quotas).astype(np.int64)
    remainders = quotas - counts
    short = count - int(counts.sum())
    # A stable sort on -remainder keeps class order among equal remainders.
    for index in np.argsort(-remainders, kind="stable")[:short]:
        counts[index] += 1
    return counts


def class_proportions(source: Source, pop: PopulationSpec) -> np.ndarray:
    """The mixture as a vector over the source's classes; DataError on unknown keys or bad proportions."""
    proportions = np.zeros(len(source.class_names))
    for key, value in dict(pop.mixture).items():
        name = str(key)
        if name not in source.class_names:
            raise DataError(f"population '{pop.name}': mixture key '{name}' is not a class of the source; "
                            f"valid classes: {', '.join(source.class_names)}")
        if not value >= 0:  # also catches NaN
            raise DataError(f"population '{pop.name}': mixture['{name}'] = {value} must be >= 0")
        proportions[source.class_names.index(name)] = float(value)
    total = proportions.sum()
    if not math.isclose(total, 1.0, rel_tol=0, abs_tol=MIXTURE_TOLERANCE):
        raise DataError(f"population '{pop.name}': mixture proportions sum to {total:.6g}, not 1")
    return proportions


def draw_populations(source: Source, pops: list) -> dict:
    """Draw every population; returns {name: (split, sorted item indices)}.

    `pops` is [(role, PopulationSpec)] in priority order (see ordered_populations). Each population draws
    its per-class counts without replacement, seeded by its own seed, from the items of that class in its
    split that earlier populations did not take, so adding a population later in the list never changes
    the earlier ones.
    """
    names = [pop.name for _, pop in pops]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"duplicate population names: {', '.join(duplicates)}")
    taken = {}  # split -> bool mask of items already drawn
    drawn = {}
    for _, pop in pops:
        if not POPULATION_NAME.fullmatch(pop.name):
            raise DataError(f"population name '{pop.name}' may use only letters, digits, '_' and '-'")
        if pop.count < 1:
            raise DataError(f"population '{pop.name}': count must be at least 1, got {pop.count}")
        if pop.seed < 0:
            raise DataError(f"population '{pop.name}': seed must be >= 0, got {pop.seed}")
        source.check_split(pop.split)
        counts = allocate_counts(pop.count, class_proportions(source, pop))
        labels = source.labels(pop.split)
        used = taken.setdefault(pop.split, np.zeros(len(labels), dtype=bool))
        rng = np.random.default_rng(pop.seed)
        chosen = []
        for label, needed in enumerate(counts):
            if needed == 0:
                continue
            available = np.flatnonzero((labels == label) & ~used)
            if len(available) < needed:
                raise DataError(
                    f"population '{pop.name}' needs {needed} images of class '{source.class_names[label]}' "
                    f"from split '{pop.split}' but only {len(available)} remain after earlier populations")
            chosen.append(rng.choice(available, size=needed, replace=False))
        indices = np.sort(np.concatenate(chosen))
        used[indices] = True
        drawn[pop.name] = (pop.split, indices)
    return drawn


def find_overlaps(drawn: dict) -> dict:
    """{"a&b": number of shared (split, index) items} for every pair of populations that share any."""
    overlaps = {}
    for (name_a, (split_a, idx_a)), (name_b, (split_b, idx_b)) in combinations(drawn.items(), 2):
        if split_a == split_b:
            shared = len(np.intersect1d(idx_a, idx_b))
            if shared:
                overlaps[f"{name_a}&{name_b}"] = shared
    return overlaps
