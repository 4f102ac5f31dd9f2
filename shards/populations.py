"""Cutting populations out of a source: exact class counts, seeded draws, no item shared between two.

Populations are drawn in a fixed priority order (auxiliary ones in config order, then the reference, then
the target); each draws only from items no earlier population took. The target comes last so that the
held-out reference does not depend on the target's size. A population's items of class k are the first
count_k of a permutation, seeded by (its seed, k), of the class's items still available: with the same
seed and mixture, a smaller population is a subset of a larger one whenever every class count grows with
the size (as largest-remainder allocation does for a fixed mixture). Everything is validated here, before
prepare writes a byte, so a bad mixture never leaves half a data directory behind.
"""
import math
import re

import numpy as np

from shards.errors import DataError
from shards.sources import Source
from shards.spec import DataSpec, PopulationSpec

MIXTURE_TOLERANCE = 1e-6
# A population name becomes a directory name, so keep it to one plain path component.
POPULATION_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Second seed word of the class draws, so they are independent of prepare's shard order (which uses 1).
CLASS_DRAW_STREAM = 2


def ordered_populations(spec: DataSpec) -> list:
    """[(role, PopulationSpec)] in drawing priority: aux in order, then the reference, then the target. A
    pretrained auxiliary is a model, not a population: it draws nothing."""
    return [("aux", pop) for pop in spec.aux if getattr(pop, "pretrained", None) is None] + \
        [("reference", spec.reference), ("target", spec.target)]


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

    `pops` is [(role, PopulationSpec)] in priority order (see ordered_populations). Each population takes,
    per class, the first count_k items of a permutation (seeded by its seed and the class) of the items of
    that class in its split that earlier populations did not take, so adding a population later in the list
    never changes the earlier ones, and growing a population's count only adds items to it.
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
        chosen = []
        for label, needed in enumerate(counts):
            if needed == 0:
                continue
            available = np.flatnonzero((labels == label) & ~used)
            if len(available) < needed:
                raise DataError(
                    f"population '{pop.name}' needs {needed} images of class '{source.class_names[label]}' "
                    f"from split '{pop.split}' but only {len(available)} remain after earlier populations")
            order = np.random.default_rng([pop.seed, CLASS_DRAW_STREAM, label]).permutation(available)
            chosen.append(order[:needed])
        indices = np.sort(np.concatenate(chosen))
        used[indices] = True
        drawn[pop.name] = (pop.split, indices)
    return drawn

