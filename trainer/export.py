"""A trained denoiser on disk, without its training state: `<dir>/ema.safetensors` + `<dir>/model.json`.

This is what later stages (fuse, distill, evaluate) and user code load. model.json records what is
needed to rebuild the network: the preset, the image shape, the EDM constants.
"""
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from trainer.checkpoint import CheckpointError
from trainer.edm import Denoiser
from trainer.unet import build_unet


def export_denoiser(directory: Path, denoiser: nn.Module, meta: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "ema.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in denoiser.state_dict().items()}, tmp)
    os.replace(tmp, directory / "ema.safetensors")
    (directory / "model.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(directory / "model.json.tmp", directory / "model.json")


def build_denoiser(meta: dict) -> Denoiser:
    net = build_unet(meta["preset"], meta["image_size"], meta["channels"], meta.get("dropout"))
    return Denoiser(net, sigma_data=meta["sigma_data"])


def load_denoiser(directory: Path) -> tuple[Denoiser, dict]:
    """The EMA denoiser of a finished stage, in eval mode, and its model.json."""
    directory = Path(directory)
    meta_path, weights = directory / "model.json", directory / "ema.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{directory} holds no finished model (model.json + ema.safetensors); "
                              "train it first")
    meta = json.loads(meta_path.read_text())
    denoiser = build_denoiser(meta)
    denoiser.load_state_dict(load_file(weights))
    # What the model was trained on; the UNet itself runs at any size, so fusion checks this.
    denoiser.image_shape = (meta["channels"], meta["image_size"], meta["image_size"])
    return denoiser.eval().requires_grad_(False), meta
