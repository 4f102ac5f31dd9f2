"""A trained network on disk, without its training state: safetensors weights and a JSON description.

This is what later stages (fuse, distill, evaluate) and user code load. The JSON records what rebuilds the
network: the preset, the image shape, the EDM constants.
"""
import json
from pathlib import Path

from safetensors.torch import load_file, save
from torch import nn

from shards.atomic import write_atomically
from shards.errors import CheckpointError
from shards.manifest import image_shape
from trainer.edm import Denoiser
from trainer.unet import build_unet

# (weights, description) of each kind of model file: a trained denoiser (its EMA weights), the one-step
# generator, the mixture's router
DENOISER_FILES = ("ema.safetensors", "model.json")
GENERATOR_FILES = ("generator.safetensors", "generator.json")
ROUTER_FILES = ("router.safetensors", "router.json")


def write_model(directory: Path, module: nn.Module, meta: dict, weights: str, meta_name: str) -> None:
    """`module`'s weights (moved to the CPU) as safetensors and `meta` as JSON, each written atomically,
    the JSON last: a directory with the JSON holds complete weights."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    write_atomically(directory / weights, save(state))
    write_atomically(directory / meta_name, (json.dumps(meta, indent=1) + "\n").encode())


def read_model(directory: Path, weights: str, meta_name: str, what: str, hint: str) -> tuple[dict, dict]:
    """(state dict, meta) written by write_model; a CheckpointError saying `hint` when missing."""
    directory = Path(directory)
    if not (directory / meta_name).is_file() or not (directory / weights).is_file():
        raise CheckpointError(f"{directory} holds no finished {what} ({meta_name} + {weights}); {hint}")
    return load_file(directory / weights), json.loads((directory / meta_name).read_text())


def export_denoiser(directory: Path, denoiser: nn.Module, meta: dict) -> None:
    write_model(directory, denoiser, meta, *DENOISER_FILES)


def has_denoiser(directory: Path) -> bool:
    return all((Path(directory) / name).is_file() for name in DENOISER_FILES)


def build_denoiser(meta: dict) -> Denoiser:
    net = build_unet(meta["preset"], meta["image_size"], meta["channels"], meta.get("dropout"))
    return Denoiser(net, sigma_data=meta["sigma_data"])


def load_denoiser(directory: Path) -> tuple[Denoiser, dict]:
    """The EMA denoiser of a finished stage, in eval mode, and its model.json."""
    state, meta = read_model(directory, *DENOISER_FILES, "model", "train it first")
    denoiser = build_denoiser(meta)
    denoiser.load_state_dict(state)
    # What the model was trained on; the UNet itself runs at any size, so fusion checks this.
    denoiser.image_shape = image_shape(meta)
    return denoiser.eval().requires_grad_(False), meta
