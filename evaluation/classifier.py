"""A small CNN classifier trained on the auxiliaries' own labels: an offline feature space for the Fréchet
distance, and a way to read the class proportions of samples.

Inception (299x299 RGB, ImageNet features) needs a download, runs ~11 images/s on a CPU and sees a 16x16
digit mostly as blur; a classifier trained on the source's own classes is ~1000x faster and its penultimate
features are about what matters here (which class, drawn how). It works for any labelled source: grey or
RGB, any image size, any class names (the digits, an image folder, CIFAR-10, LSUN categories). It plugs into
torch-fidelity as the feature extractor "classifier", so its Fréchet distance is computed by the same code as
FID, and its predicted labels give the class proportions of samples, to compare with a population's mixture.

Weights are a safetensors file with a JSON sidecar (same stem, .json) holding the input shape, the class
names and the held-out accuracy, so a loaded classifier knows its input and a report can state its quality.
"""
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from shards.atomic import write_atomically
from shards.errors import ConfigError, DataError
from shards.pixels import to_unit
from shards.seeds import Stream, generator, seed_of

EXTRACTOR_NAME = "classifier"
FEATURE_DIM = 64
MIN_SIZE = 4  # two 2x poolings


class Classifier(nn.Module):
    """[B, C, S, S] images in [-1, 1] -> logits [B, classes]; `features` gives the 64-d penultimate layer.

    Global average pooling makes it work for any S >= 4, so the same code serves 16x16 digits or 64x64 LSUN.
    """

    def __init__(self, channels: int, image_size: int, classes: int):
        super().__init__()
        self.channels, self.image_size, self.classes = channels, image_size, classes
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, FEATURE_DIM, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images [B, 1|3, H, W] -> [B, channels, S, S]: grey <-> RGB, then an antialiased resize."""
        images = images.float()
        if images.shape[1] != self.channels:
            images = images.mean(dim=1, keepdim=True).expand(-1, self.channels, -1, -1)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return images


def sidecar_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_classifier(model: Classifier, out_path: Path, class_names: Sequence[str], accuracy: float) -> None:
    """Weights (safetensors) and sidecar JSON, each written atomically."""
    out_path = Path(out_path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(out_path, save(state))
    info = {"channels": model.channels, "image_size": model.image_size, "class_names": list(class_names),
            "accuracy": accuracy}
    write_atomically(sidecar_path(out_path), (json.dumps(info, indent=2) + "\n").encode())


def classifier_info(weights_path) -> dict:
    return json.loads(sidecar_path(weights_path).read_text())


def load_classifier(weights_path) -> Classifier:
    """The classifier saved by `save_classifier`, in eval mode; DataError naming a missing file."""
    if weights_path is None:
        raise ConfigError(f'the "{EXTRACTOR_NAME}" feature extractor needs a weights file: run `scorefuse prepare`')
    weights_path = Path(weights_path)
    for path in (weights_path, sidecar_path(weights_path)):
        if not path.is_file():
            raise DataError(f"classifier file not found: {path}; run `scorefuse prepare` to train it")
    info = classifier_info(weights_path)
    model = Classifier(int(info["channels"]), int(info["image_size"]), len(info["class_names"]))
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval().requires_grad_(False)


def random_shift(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in x and y independently, filling with background (-1)."""
    b, c, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=rng)
    dx = torch.randint(0, 3, (b,), generator=rng)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


@contextmanager
def one_thread():
    """Run torch ops on one CPU thread, then restore the previous count.

    Convolutions this small gain nothing from intra-op threads, and on a shared machine two spinning
    threads competing for a busy core made training many times slower. One thread also makes the trained
    weights independent of the machine's core count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_classifier(images: torch.Tensor, labels, class_names: Sequence[str], out_path: Path, seed: int = 0,
                     epochs: int = 10, held_out_fraction: float = 0.15, batch_size: int = 64, lr: float = 5e-3,
                     max_image_size: int = 32) -> dict:
    """Train on uint8 [N, C, S, S] images (labels index `class_names`) on the CPU, save to `out_path`
    (+ sidecar), return a summary.

    Images larger than `max_image_size` are seen downsampled to it: the classifier's job is which class and
    roughly how it is drawn, and a CPU trains it in seconds at 32x32. A random `held_out_fraction` of the
    images is kept out of training and gives the reported accuracy. Adam with a one-cycle schedule (with a
    constant rate the digits' held-out accuracy after 10 epochs varied much more between seeds).
    Deterministic given `seed`: the split, the initialisation (global RNG forked, so the caller's stream is
    untouched), the batch order and the shifts all come from it.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected uint8 square images [N, C, S, S], got {images.dtype} {tuple(images.shape)}")
    channels, size = images.shape[1], min(images.shape[-1], max_image_size)
    if size < MIN_SIZE:
        raise ConfigError(f"images of {size}x{size} pixels are too small for the feature classifier (at least "
                          f"{MIN_SIZE}); set eval.extractor=inception")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        raise DataError(f"the feature classifier needs at least two classes in the auxiliary populations, "
                        f"got {[class_names[i] for i in present]}")
    rng = generator(seed, Stream.SPLIT)
    order = torch.randperm(len(images), generator=rng)
    n_held_out = max(1, int(round(held_out_fraction * len(images))))
    held_out, train = order[:n_held_out], order[n_held_out:]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(seed, Stream.CLASSIFIER_INIT))
        model = Classifier(channels, size, len(class_names))
    x = model.prepare_input(to_unit(images))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    with one_thread():
        for _ in range(epochs):
            for batch in train[torch.randperm(len(train), generator=rng)].split(batch_size):
                loss = F.cross_entropy(model(random_shift(x[batch], rng)), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x[held_out]).argmax(1) == y[held_out]).float().mean().item()
    save_classifier(model, out_path, class_names, accuracy)
    return {"accuracy": accuracy, "image_size": size, "channels": channels, "classes": len(class_names),
            "train_images": len(train), "held_out_images": n_held_out}


@torch.no_grad()
def class_indicators(model: Classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The class the classifier assigns to each of `images` ([-1, 1], [B, 1|3, H, W]) as one-hot rows, float64
    [B, classes] on the CPU: their mean is the class proportions, and resampling rows resamples images."""
    device = next(model.parameters()).device
    predicted = [model(model.prepare_input(batch.to(device))).argmax(1).cpu() for batch in images.split(batch_size)]
    labels = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long)
    return torch.nn.functional.one_hot(labels, model.classes).double()


def class_proportions(model: Classifier, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Fraction of `images` ([-1, 1], [B, 1|3, H, W]) the classifier assigns to each class: [classes], sums to 1."""
    return (class_indicators(model, images, batch_size).sum(0) / max(len(images), 1)).numpy()


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's protocol around Classifier: uint8 [B, 3, H, W] in, features (and logits) out.

    torch-fidelity hands every extractor 3-channel uint8 images; they are turned into the classifier's own
    input (channels and size) here.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 16, 16]) * 255).to(torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        features = self.classifier.features(self.classifier.prepare_input(to_unit(x)))
        computed = {"features": features, "logits": self.classifier.head(features)}
        return tuple(computed[name] for name in self.features_list)


# Guarded: the registry refuses a second registration (e.g. on importlib.reload).
if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR_NAME, ClassifierFeatureExtractor)
