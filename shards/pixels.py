"""The one conversion between stored pixels (uint8, 0..255) and what the networks see (float32 in [-1, 1]):
the shards store the first, the training stream and every model speak the second."""
import torch


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255], clamped and rounded (not truncated, which would bias dark)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
