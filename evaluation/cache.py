"""Evaluation work kept on disk, keyed by everything it depends on.

Sampling a model and running the likelihood ODE are the expensive parts of `evaluate` (at CIFAR-10 scale,
50,000 samples of every model on every resubmission). Each result is stored as one .npz whose name is a hash
of its inputs: the model's weights (stages.catalogue.Model.fingerprint), the settings that shape the result
(sample count, seed, sampler, feature weights, ODE steps ...) and what it was measured on (a population's
content hash). Re-running `evaluate`, or running it after a new model appeared, recomputes only what changed;
a change of any input is a new key, so nothing stale is ever read.
"""
import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shards.atomic import sha256_text, write_atomically


class ResultCache:
    def __init__(self, directory: Path, enabled: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled

    def path(self, kind: str, key: dict) -> Path:
        return self.directory / f"{kind}-{sha256_text(repr(sorted(key.items())))[:24]}.npz"

    def get(self, kind: str, key: dict, compute: Callable[[], dict[str, torch.Tensor]],
            main: bool = True, barrier: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
        """The stored arrays of (kind, key), or compute() them (on every rank: it may be collective) and store
        them (on the main process, atomically). Every rank returns the same dict."""
        path = self.path(kind, key)
        if self.enabled and path.is_file():
            with np.load(path) as stored:
                return {name: torch.from_numpy(stored[name]) for name in stored.files}
        result = compute()
        if self.enabled and main:
            buffer = io.BytesIO()
            np.savez(buffer, **{name: torch.as_tensor(value).numpy() for name, value in result.items()})
            write_atomically(path, buffer.getvalue())
        barrier()
        return result
