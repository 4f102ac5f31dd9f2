"""The feature classifier: trains in seconds on the digits, classifies held-out digits, works as a
torch-fidelity extractor, and takes RGB images of other sizes and class names (an image folder, CIFAR-10)."""
import json

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from sklearn.datasets import load_digits
from torch_fidelity.metric_fid import KEY_METRIC_FID

from evaluation.classifier import class_proportions, load_classifier, train_classifier
from shards.errors import DataError
from shards.pixels import to_unit

DIGITS = [str(c) for c in range(10)]

TRAIN = 1500  # the rest (297 images) is never seen by training


@pytest.fixture(scope="module")
def digits():
    """sklearn's 1,797 digits as uint8 [N, 1, 16, 16] (8x8 upsampled bilinearly), labels, in a fixed order."""
    data = load_digits()
    images = np.stack([
        np.asarray(Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((16, 16), Image.BILINEAR))
        for image in data.images])
    order = np.random.RandomState(0).permutation(len(images))
    return torch.from_numpy(images[order])[:, None], data.target[order]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    images, labels = digits
    path = tmp_path_factory.mktemp("classifier") / "digits.safetensors"
    summary = train_classifier(images[:TRAIN], labels[:TRAIN], DIGITS, path, seed=0)
    return path, summary


def test_training_reaches_high_held_out_accuracy(trained):
    path, summary = trained
    assert summary["accuracy"] > 0.9
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar == {"channels": 1, "image_size": 16, "class_names": DIGITS, "accuracy": summary["accuracy"]}


def test_training_is_deterministic_given_seed(digits, tmp_path):
    images, labels = digits
    runs = [train_classifier(images[:300], labels[:300], DIGITS, tmp_path / f"{i}.safetensors", seed=5, epochs=1)
            for i in range(2)]
    assert runs[0] == runs[1]
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()


def test_class_proportions_of_one_digit(trained, digits):
    path, _ = trained
    images, labels = digits
    threes = images[TRAIN:][labels[TRAIN:] == 3]
    model = load_classifier(path)
    proportions = class_proportions(model, to_unit(threes))
    assert proportions.shape == (10,) and proportions.sum() == pytest.approx(1.0)
    assert proportions.argmax() == 3 and proportions[3] > 0.85
    # three channels at another size are reduced to the classifier's grey 16x16
    rgb_large = torch.nn.functional.interpolate(to_unit(threes), size=32, mode="bilinear").expand(-1, 3, -1, -1)
    assert class_proportions(model, rgb_large).argmax() == 3


def test_missing_classifier_is_named(tmp_path):
    with pytest.raises(DataError, match="absent.safetensors"):
        load_classifier(tmp_path / "absent.safetensors")


def test_rgb_images_of_another_size_and_named_classes(digits, tmp_path):
    """An RGB source at 40x40 with named classes (as an image folder gives them): colour tells the classes
    apart here, the classifier learns at its capped input size and reads colour images back."""
    images, labels = digits
    colours = torch.tensor([[255, 40, 40], [40, 40, 255]], dtype=torch.float32)[:, :, None, None]
    label = torch.as_tensor(labels[:400] % 2)
    big = torch.nn.functional.interpolate(images[:400].float(), size=40, mode="bilinear")
    rgb = (big / 255 * colours[label]).round().to(torch.uint8)
    path = tmp_path / "rgb.safetensors"
    summary = train_classifier(rgb, label, ["red", "blue"], path, seed=0, epochs=3)
    assert summary["channels"] == 3 and summary["image_size"] == 32 and summary["accuracy"] > 0.9
    model = load_classifier(path)
    assert class_proportions(model, to_unit(rgb[label == 1])).argmax() == 1


class RGBImages(torch.utils.data.Dataset):
    """torch-fidelity's dataset convention: each item a uint8 [3, H, W] tensor."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].expand(3, -1, -1)


def test_registered_extractor_separates_digit_groups(trained, digits):
    path, _ = trained
    images, labels = digits

    def distance(a, b):
        return torch_fidelity.calculate_metrics(
            input1=RGBImages(a), input2=RGBImages(b), fid=True, feature_extractor="classifier",
            feature_extractor_weights_path=str(path), cuda=False, cache=False, verbose=False,
            save_cpu_ram=True)[KEY_METRIC_FID]

    low, high = images[labels < 5][:300], images[labels >= 5][:300]
    itself = distance(low, low)
    halves = distance(low[::2], low[1::2])
    groups = distance(low, high)
    assert abs(itself) < 1e-3 * groups
    assert groups > 5 * halves
