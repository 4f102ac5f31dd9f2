"""The run directory: where every stage of one experiment reads and writes.

    runs/<name>/config.yaml     the resolved config, written by the first stage
    runs/<name>/data/           shards + manifest.json (+ the digit classifier for digits runs)
    runs/<name>/aux/<k>/        one auxiliary model: checkpoints/, ema.safetensors, samples.png, metrics.jsonl
    runs/<name>/fuse/           lambda.json, lambda.png, samples.png, sgd/ (the paper's SGD fit, checkpointed)
    runs/<name>/baselines/<b>/  target-scratch, target-finetune (trained), checkpoint-merge (weights averaged)
    runs/<name>/eval_cache/     reference statistics, keyed by population hash
    runs/<name>/report.md/.json
"""
from dataclasses import dataclass
from pathlib import Path

from launch.config import ConfigError, RunConfig, to_yaml
from shards.files import write_atomically
from shards.manifest import MANIFEST_NAME, load_manifest
from shards.prepare import data_fingerprint


@dataclass
class RunDir:
    root: Path

    @classmethod
    def of(cls, cfg: RunConfig) -> "RunDir":
        return cls(cfg.run_dir)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def aux(self, name: str) -> Path:
        return self.root / "aux" / name

    def aux_dirs(self, cfg: RunConfig) -> dict[str, Path]:
        return {p.name: self.aux(p.name) for p in cfg.data.aux}

    @property
    def fuse(self) -> Path:
        return self.root / "fuse"

    def baseline(self, name: str) -> Path:
        return self.root / "baselines" / name

    @property
    def eval_cache(self) -> Path:
        return self.root / "eval_cache"

    @property
    def digit_classifier(self) -> Path:
        return self.data / "digit_classifier.safetensors"

    def record_config(self, cfg: RunConfig) -> None:
        """Write config.yaml once. A later stage may change training, evaluation or reader settings,
        but not what decides the populations: a run directory holds one set of them."""
        path = self.root / "config.yaml"
        if (self.data / MANIFEST_NAME).is_file() and load_manifest(self.data)["fingerprint"] != data_fingerprint(cfg.data):
            raise ConfigError(f"{self.root}: its shards were prepared from a different `data` section "
                              "(populations or source); use another run name (name=...) or delete the directory")
        if path.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomically(path, to_yaml(cfg).encode())
