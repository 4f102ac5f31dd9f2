"""Pictures a person looks at: grids of images as PNG (pixels by shards.pixels.to_uint8, the quantisation the
Fréchet distance sees), laid out by torchvision's make_grid."""
import io
from pathlib import Path
from typing import Optional

import math
import torch
from PIL import Image
from torchvision.utils import make_grid

from shards.atomic import write_atomically
from shards.pixels import to_uint8

PADDING = 1  # pixels between cells, before scaling


def save_png(images: torch.Tensor, path: Path, nrow: Optional[int] = None, scale: int = 1) -> None:
    """Tile uint8 images [B, C, H, W] (C = 1 or 3) into a PNG with `nrow` images per row (default: a
    near-square grid), enlarged `scale` times with nearest-neighbour so that 16x16 digits stay sharp.
    Written atomically; one-channel images stay one channel (mode L)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1|3, H, W], got {tuple(images.shape)}")
    channels = images.shape[1]
    nrow = min(nrow or math.ceil(math.sqrt(len(images))), len(images))
    grid = make_grid(images.cpu(), nrow=nrow, padding=PADDING, pad_value=0)[:channels]  # make_grid makes grey RGB
    array = grid.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if channels == 1 else array)
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_atomically(Path(path), buffer.getvalue())


def save_grid(images: torch.Tensor, path: Path, nrow: Optional[int] = None, scale: int = 1) -> None:
    """save_png of model outputs in [-1, 1]."""
    save_png(to_uint8(images), path, nrow, scale)
