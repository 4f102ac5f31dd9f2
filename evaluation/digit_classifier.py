"""A small CNN digit classifier, used as the feature extractor for the embedded 16x16 grey digits.

Inception (299x299 RGB, ImageNet features) runs ~11 images/s on CPU and sees a 16x16 digit mostly as
blur; a classifier trained on the digits themselves is ~1000x faster and its penultimate features are
about what matters here (which digit, drawn how). It plugs into torch-fidelity as the feature extractor
"digit-classifier", so the Fréchet distance is computed by the same code path as FID, and its
predicted labels give a run's class proportions, to compare with a population's mixture.

Weights are a safetensors file with a JSON sidecar (same stem, .json) holding image_size, classes and the
held-out accuracy, so a loaded classifier knows its input size and a report can state its quality.
"""
import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from evaluation.errors import EvaluationError
from shards.files import write_atomically

EXTRACTOR_NAME = "digit-classifier"
NUM_CLASSES = 10
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """[B, 1, S, S] images in [-1, 1] -> logits [B, 10]; `features` gives the 64-d penultimate layer.

    Global average pooling makes it work for any small S (>= 4), so the same code serves 16x16 or 32x32.
    """

    def __init__(self, image_size: int = 16):
        super().__init__()
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, FEATURE_DIM, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def to_classifier_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """[-1, 1] images [B, 1|3, H, W] -> grey [B, 1, S, S]: channel mean, then bilinear (antialiased) resize."""
    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-2:] != (image_size, image_size):
        grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False,
                             antialias=True)
    return grey


def sidecar_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_digit_classifier(model: DigitClassifier, out_path: Path, accuracy: float) -> None:
    """Weights (safetensors) and sidecar JSON, each written atomically."""
    out_path = Path(out_path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(out_path, save(state))
    info = {"image_size": model.image_size, "classes": NUM_CLASSES, "accuracy": accuracy}
    write_atomically(sidecar_path(out_path), (json.dumps(info, indent=2) + "\n").encode())


def load_digit_classifier(weights_path) -> DigitClassifier:
    """The classifier saved by `save_digit_classifier`, in eval mode; EvaluationError naming a missing file."""
    if weights_path is None:
        raise EvaluationError(
            f'the "{EXTRACTOR_NAME}" feature extractor needs a weights file; train one with '
            "evaluation.digit_classifier.train_digit_classifier and pass its path")
    weights_path = Path(weights_path)
    for path in (weights_path, sidecar_path(weights_path)):
        if not path.is_file():
            raise EvaluationError(f"digit classifier file not found: {path}")
    info = json.loads(sidecar_path(weights_path).read_text())
    model = DigitClassifier(int(info["image_size"]))
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval().requires_grad_(False)


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in x and y independently, filling with background (-1)."""
    b, _, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=generator)
    dx = torch.randint(0, 3, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


@contextmanager
def one_thread():
    """Run torch ops on one CPU thread, then restore the previous count.

    Convolutions this small gain nothing from intra-op threads, and on a shared machine two spinning
    threads competing for a busy core made training ~15x slower (60 s instead of 4 s). One thread also
    makes the trained weights independent of the machine's core count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_digit_classifier(images: torch.Tensor, labels, out_path: Path, seed: int = 0, epochs: int = 10,
                           held_out_fraction: float = 0.15, batch_size: int = 64, lr: float = 5e-3) -> dict:
    """Train on uint8 [N, 1, S, S] digits (labels 0..9) on CPU, save to `out_path` (+ sidecar), return a summary.

    A random `held_out_fraction` of the images is kept out of training and gives the reported accuracy.
    Adam with a one-cycle schedule: with a constant rate, held-out accuracy after 10 epochs ranged 0.82-0.96
    over seeds; with it, 0.96-0.98 (~5 s on one CPU thread for 1,500 images).
    Deterministic given `seed`: the split, the initialisation (global RNG forked, so the caller's stream is
    untouched), the batch order and the shifts all come from it.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected uint8 images [N, 1, S, S], got {images.dtype} {tuple(images.shape)}")
    x = images.float() / 127.5 - 1
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_held_out = max(1, int(round(held_out_fraction * len(x))))
    held_out, train = order[:n_held_out], order[n_held_out:]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(images.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    with one_thread():
        for _ in range(epochs):
            for batch in train[torch.randperm(len(train), generator=generator)].split(batch_size):
                loss = F.cross_entropy(model(random_shift(x[batch], generator)), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x[held_out]).argmax(1) == y[held_out]).float().mean().item()
    save_digit_classifier(model, out_path, accuracy)
    return {"accuracy": accuracy, "image_size": model.image_size, "classes": NUM_CLASSES,
            "train_images": len(train), "held_out_images": n_held_out}


@torch.no_grad()
def class_proportions(classifier_weights_path, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Fraction of `images` ([-1, 1], [B, 1|3, H, W]) the classifier assigns to each digit: shape [10], sums to 1."""
    model = load_digit_classifier(classifier_weights_path).to(images.device)
    counts = torch.zeros(NUM_CLASSES, dtype=torch.long)
    for batch in images.split(batch_size):
        predicted = model(to_classifier_input(batch, model.image_size)).argmax(1)
        counts += torch.bincount(predicted.cpu(), minlength=NUM_CLASSES)
    return (counts.double() / max(len(images), 1)).numpy()


class DigitFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's protocol around DigitClassifier: uint8 [B, 3, H, W] in, features as a tuple out.

    torch-fidelity hands every extractor 3-channel uint8 images of any size; they are turned back into
    1-channel [-1, 1] images at the classifier's own size.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_digit_classifier(feature_extractor_weights_path)
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
        grey = to_classifier_input(x.float() / 127.5 - 1, self.classifier.image_size)
        features = self.classifier.features(grey)
        computed = {"features": features, "logits": self.classifier.head(features)}
        return tuple(computed[name] for name in self.features_list)


# Guarded: the registry refuses a second registration (e.g. on importlib.reload).
if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR_NAME, DigitFeatureExtractor)
