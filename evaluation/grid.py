"""Sample grids as PNG, so a person can look at what a model draws (pixels by trainer.samples.to_uint8,
as for the Fréchet distance)."""
import io
import math
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from shards.files import write_atomically
from trainer.samples import to_uint8

PADDING = 1  # pixels between cells, before scaling


def save_grid(images: torch.Tensor, path: Path, nrow: Optional[int] = None, scale: int = 1) -> None:
    """Tile images [B, C, H, W] in [-1, 1] (C = 1 or 3) into a PNG with `nrow` images per row.

    nrow defaults to ceil(sqrt(B)) (a near-square grid). `scale` enlarges with nearest-neighbour so 16x16
    digits stay sharp. The file is replaced atomically.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1|3, H, W], got {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol_cells, nrow_cells = min(nrow, b), math.ceil(b / nrow)
    pixels = to_uint8(images).cpu()
    canvas = torch.zeros(c, nrow_cells * (h + PADDING) + PADDING, ncol_cells * (w + PADDING) + PADDING,
                         dtype=torch.uint8)
    for i in range(b):
        y = PADDING + (i // nrow) * (h + PADDING)
        x = PADDING + (i % nrow) * (w + PADDING)
        canvas[:, y:y + h, x:x + w] = pixels[i]
    array = canvas.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if c == 1 else array)  # 2-D -> "L", H x W x 3 -> "RGB"
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_atomically(Path(path), buffer.getvalue())
