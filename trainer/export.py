"""A trained denoiser on disk, without its training state: `<dir>/ema.safetensors` + `<dir>/model.json`.

This is what later stages (fuse, distill, evaluate) and user code load. model.json records what is
needed to rebuild the network: the preset, the image shape, the EDM constants.
"""
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from shards.manifest import image_shape
from trainer.checkpoint import CheckpointError
from trainer.edm import Denoiser
from trainer.unet import build_unet


def write_model(directory: Path, module: nn.Module, meta: dict, weights: str, meta_name: str) -> None:
    """`module`'s weights as safetensors and `meta` as JSON, each renamed into place when complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{weights}.tmp"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp)
    os.replace(tmp, directory / weights)
    (directory / f"{meta_name}.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(directory / f"{meta_name}.tmp", directory / meta_name)


def read_model(directory: Path, weights: str, meta_name: str, what: str, hint: str) -> tuple[dict, dict]:
    """(state dict, meta) written by write_model; a CheckpointError saying `hint` when missing."""
    directory = Path(directory)
    if not (directory / meta_name).is_file() or not (directory / weights).is_file():
        raise CheckpointError(f"{directory} holds no finished {what} ({meta_name} + {weights}); {hint}")
    return load_file(directory / weights), json.loads((directory / meta_name).read_text())


def export_denoiser(directory: Path, denoiser: nn.Module, meta: dict) -> None:
    write_model(directory, denoiser, meta, "ema.safetensors", "model.json")


def build_denoiser(meta: dict) -> Denoiser:
    net = build_unet(meta["preset"], meta["image_size"], meta["channels"], meta.get("dropout"))
    return Denoiser(net, sigma_data=meta["sigma_data"])


def load_denoiser(directory: Path) -> tuple[Denoiser, dict]:
    """The EMA denoiser of a finished stage, in eval mode, and its model.json."""
    state, meta = read_model(directory, "ema.safetensors", "model.json", "model", "train it first")
    denoiser = build_denoiser(meta)
    denoiser.load_state_dict(state)
    # What the model was trained on; the UNet itself runs at any size, so fusion checks this.
    denoiser.image_shape = image_shape(meta)
    return denoiser.eval().requires_grad_(False), meta
