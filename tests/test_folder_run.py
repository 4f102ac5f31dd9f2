"""An image-folder source offline: RGB images of named classes get the feature classifier (so a domain distance
and class proportions) without Inception, and a config that asks for Inception without its weights stops at
prepare, before anything is written, naming the file."""
import json
import os

import numpy as np
import torch
from PIL import Image

from evaluation.classifier import class_proportions, load_classifier
from evaluation.features import FeatureSpace, frechet
from shards.pixels import to_unit
from shards.stream import read_population
from tests.conftest import scorefuse_here

CONFIG = """
name: folder
data:
  source: {kind: folder, path: PATH, image_size: 8}
  aux:
    - {name: mostly-red, mixture: {red: 0.8, blue: 0.2}, count: 40, seed: 1}
    - {name: mostly-blue, mixture: {red: 0.2, blue: 0.8}, count: 40, seed: 2}
  target: {name: target, mixture: {red: 0.5, blue: 0.5}, count: 10, seed: 3}
  reference: {name: reference, mixture: {red: 0.5, blue: 0.5}, count: 20, seed: 4}
  min_shards: 2
  workers: 0
"""


def colour_folder(root):
    """Two classes told apart by colour, with a random blob on each image so no two are equal."""
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(60):
            image = np.zeros((12, 12, 3), np.uint8)
            image[..., channel] = 120 + rng.integers(0, 120, (12, 12))
            Image.fromarray(image).save(root / name / f"{i:03d}.png")


def test_an_rgb_folder_gets_a_domain_distance_and_class_proportions_offline(tmp_path, capfd):
    colour_folder(tmp_path / "images")
    config = tmp_path / "folder.yaml"
    config.write_text(CONFIG.replace("PATH", str(tmp_path / "images")))
    env = {"TORCH_HOME": str(tmp_path / "empty-torch-home")}  # no cached Inception: auto -> the classifier
    os.environ.update(env)
    try:
        code, _, err = scorefuse_here(capfd, "prepare", "--config", config, f"root={tmp_path / 'runs'}")
    finally:
        for key in env:
            os.environ.pop(key)
    assert code == 0, err
    data = tmp_path / "runs" / "folder" / "data"
    info = json.loads((data / "classifier.json").read_text())
    assert info["channels"] == 3 and info["class_names"] == ["blue", "red"] and info["accuracy"] > 0.9
    reference, labels = read_population(data, "reference")
    proportions = class_proportions(load_classifier(data / "classifier.safetensors"), to_unit(reference))
    assert np.allclose(proportions, np.bincount(labels.numpy(), minlength=2) / len(labels))
    space = FeatureSpace("classifier", str(data / "classifier.safetensors"), tmp_path / "cache")
    aux_red = read_population(data, "mostly-red")[0]
    assert frechet(space.extract(aux_red), space.extract(reference)) > frechet(
        space.extract(reference[:10]), space.extract(reference[10:]))
    assert torch.isfinite(space.extract(aux_red)).all()


def test_missing_inception_weights_stop_prepare_before_anything_is_written(tmp_path, capfd):
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    saved = {k: os.environ.get(k) for k in offline}
    os.environ.update(offline)
    try:
        code, _, err = scorefuse_here(capfd, "prepare", f"root={tmp_path / 'runs'}", "eval.extractor=inception")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("scorefuse: error:")]
    assert len(errors) == 1  # after torch's own "Downloading: ..." notice
    assert "weights-inception-2015-12-05-6726825d.pth" in errors[0] and "eval.inception_weights" in errors[0]
    assert not (tmp_path / "runs").exists()
