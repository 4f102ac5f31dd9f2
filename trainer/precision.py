"""Numeric precision outside training: the autocast dtype a precision setting names, and a scope in which
float32 really is float32.

PyTorch lets cuDNN convolutions use TF32 by default on Ampere and newer GPUs (10 mantissa bits), so "no
autocast" alone is not an fp32 pass there. Measurements that are compared at 1e-3 (the NLL in bits/dim, the
Gram statistics of the exact lambda fit) run inside `full_fp32()`.
"""
from contextlib import contextmanager

import torch

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision setting (no | bf16 | fp16); None for float32."""
    return AUTOCAST[precision]


@contextmanager
def full_fp32():
    """TF32 off for matrix products and convolutions (cuBLAS and cuDNN) inside, restored after. On the CPU
    the flags exist and change nothing, so the same code runs (and is tested) there."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def forward_precision(device_type: str, dtype: torch.dtype | None):
    """The scope of a forward pass at `dtype`: autocast to it, or with None true float32 (full_fp32)."""
    return full_fp32() if dtype is None else torch.autocast(device_type, dtype=dtype)


def with_autocast(sample_fn, precision: str):
    """`sample_fn` (latents -> images) run under autocast of `precision` on the latents' device; itself for
    "no". The EDM denoisers keep their skip connection and output in float32 under autocast, so only the
    networks' bulk runs in bf16."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return sample_fn

    def sample(latents: torch.Tensor) -> torch.Tensor:
        with torch.autocast(latents.device.type, dtype=dtype):
            return sample_fn(latents).float()
    return sample
