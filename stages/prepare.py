"""prepare: the populations as WebDataset shards (shards/prepare.py), and the feature classifier of the
offline Fréchet distance and the class proportions, trained on the auxiliary populations' labels only (the
target and the held-out reference stay unseen). When the run's distances are FID, the Inception weights are
loaded here, before any training, so a node that cannot download them says so now and names the file.
One process; every other stage reads what it wrote.
"""
import torch

from evaluation.classifier import train_classifier
from evaluation.features import build_feature_extractor
from shards.prepare import prepare
from shards.stream import read_population
from stages.config import RunConfig, extractor_for, record_config
from trainer.progress import say
from stages.rundir import RunDir


def run(cfg: RunConfig, shared=None) -> dict:
    """`shared`: another data directory whose identical populations are used in place (the sweep's runs
    share the main run's auxiliary and reference shards)."""
    run_dir = RunDir.of(cfg)
    if extractor_for(cfg) == "inception":  # before anything is written: a ConfigError naming the file
        build_feature_extractor("inception", cfg.eval.inception_weights, "cpu")
    manifest = prepare(cfg.data, run_dir.data, log=say, shared=shared)
    record_config(cfg, run_dir)
    if not run_dir.classifier.is_file():
        parts = [read_population(run_dir.data, p.name, cfg.data.max_bad_samples) for p in cfg.data.aux
                 if p.pretrained is None]  # a pretrained auxiliary brings no labelled images
        labels = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0)
        if len(labels.unique()) < 2:  # a source of one class: no class proportions to read
            say("feature classifier: the auxiliary populations hold fewer than two classes; no classifier, "
                "no class proportions")
        else:
            info = train_classifier(torch.cat([p[0] for p in parts]), labels, manifest["class_names"],
                                    run_dir.classifier, seed=cfg.train.seed)
            say(f"feature classifier: held-out accuracy {info['accuracy']:.3f} -> {run_dir.classifier}")
    say(f"prepare: shards and manifest in {run_dir.data}")
    return manifest
