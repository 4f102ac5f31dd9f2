"""prepare: the populations as WebDataset shards (shards/prepare.py), and the feature classifier of the
offline Fréchet distance and the class proportions, trained on the auxiliary populations' labels only (the
target and the held-out reference stay unseen). One process; every other stage reads what it wrote.
"""
import torch

from evaluation.classifier import train_classifier
from shards.prepare import prepare
from shards.stream import read_population
from trainer.config import RunConfig, extractor_for
from trainer.progress import say
from trainer.rundir import RunDir


def run(cfg: RunConfig) -> dict:
    run_dir = RunDir.of(cfg)
    manifest = prepare(cfg.data, run_dir.data, log=say)
    run_dir.record_config(cfg)
    if extractor_for(cfg) == "classifier" and not run_dir.classifier.is_file():
        parts = [read_population(run_dir.data, p.name, cfg.data.max_bad_samples) for p in cfg.data.aux]
        info = train_classifier(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                manifest["class_names"], run_dir.classifier, seed=cfg.train.seed)
        say(f"feature classifier: held-out accuracy {info['accuracy']:.3f} -> {run_dir.classifier}")
    say(f"prepare: shards and manifest in {run_dir.data}")
    return manifest
