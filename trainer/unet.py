"""DDPM++ UNet (the architecture of EDM's `SongUNet` with its "DDPM++" settings) and named presets.

The network F(x_in, c_noise) is the raw function inside EDM's preconditioning (trainer/edm.py): it
sees a unit-variance input and the noise label c_noise = ln(sigma)/4 and returns a unit-variance
target. DDPM++ is the architecture behind EDM's CIFAR-10 FID of 1.97, so the teachers of this project
use it unchanged:

* noise label -> sinusoidal embedding -> 2-layer MLP (SiLU after each layer); every residual block
  adds a linear projection of that embedding to its features (additive, not scale-shift: DDPM++);
* residual blocks GroupNorm-SiLU-conv3x3, +embedding, GroupNorm-SiLU-dropout-conv3x3, with the sum
  of branch and skip scaled by sqrt(1/2) so that the variance stays constant through depth;
* single-head self-attention after the blocks at the resolutions in `attn_resolutions`;
* down/up-sampling is done by residual blocks (average pooling / nearest neighbour, i.e. EDM's
  [1, 1] resample filter) with a 1x1-conv skip; every encoder output is a skip for the decoder;
* output GroupNorm-SiLU-conv3x3.

Initialisation follows EDM's DDPM++: Xavier-uniform weights, zero biases, attention qkv with gain
sqrt(0.2), and zero for the last conv of every branch and the output conv, so that at initialisation
every block is the identity on its skip path and F = 0 (the denoiser starts as c_skip * x, the
optimal denoiser for Gaussian data with variance sigma_data^2).
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SKIP_SCALE = math.sqrt(0.5)

PRESETS: dict[str, dict] = {
    # The grey digits on two CPU cores: 0.32M parameters, widths 16/32/32 at three levels (8/4/2 pixels for the
    # demo's 8x8, 16/8/4 at 16x16), attention only at 4x4 where it costs 16 tokens (bench/train_step.py times it).
    "tiny": dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1,
                 attn_resolutions=(4,), dropout=0.0),
    # EDM's CIFAR-10 DDPM++ (training config "ddpmpp", dropout 0.13): ~56M parameters at 32x32x3.
    "ddpmpp-cifar10": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                           attn_resolutions=(16,), dropout=0.13),
    # The CIFAR-10 network at 28x28 (MNIST-style IDX sets at their own size): its levels are 28/14/7, so its
    # attention sits at 14x14, the level 16x16 is at 32x32. 55.7M parameters for grey images.
    "ddpmpp-28": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                      attn_resolutions=(14,), dropout=0.13),
    # EDM's 64x64 DDPM++ (FFHQ/AFHQv2 config). EDM used dropout 0.05 for FFHQ (70k images) and
    # 0.25 for AFHQv2 (15k); the LSUN populations cut for this project are tens of thousands of
    # images, so 0.1 sits between the two. Override per run through build_unet(dropout=...).
    "ddpmpp-64": dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4,
                      attn_resolutions=(16,), dropout=0.1),
}


def _conv(in_channels: int, out_channels: int, kernel: int, gain: float = 1.0) -> nn.Conv2d:
    """Same-padding conv with EDM's DDPM++ init (Xavier-uniform scaled by `gain`, zero bias);
    gain 0 gives a zero-initialised conv."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    nn.init.xavier_uniform_(conv.weight, gain=gain)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with at most 32 groups and at least 4 channels per group (EDM's rule), reduced to
    the largest group count that divides `channels` so that odd widths (decoder concatenations)
    still work. eps 1e-6 as in EDM."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class SinusoidalEmbedding(nn.Module):
    """Transformer-style embedding [cos(x f_k), sin(x f_k)] with frequencies f_k from 1 down to 1e-4
    (both ends included, as EDM's DDPM++ uses), turning the scalar c_noise into `channels` features
    that an MLP can use."""

    def __init__(self, channels: int, max_period: float = 10000.0):
        super().__init__()
        half = channels // 2
        exponents = torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
        self.register_buffer("frequencies", max_period ** -exponents, persistent=False)

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        angles = noise_labels.to(torch.float32)[:, None] * self.frequencies[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, residual and scaled by sqrt(1/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = _conv(channels, 3 * channels, 1, gain=math.sqrt(0.2))
        self.proj = _conv(channels, channels, 1, gain=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, 1, channels, height * width)
        # [B, 1, HW, C] each, contiguous so that the fused attention kernels may run; those have no double
        # backward, so R1's gradient penalty selects the math kernel (trainer/score_mismatch.py).
        q, k, v = (t.transpose(-1, -2).contiguous() for t in qkv.unbind(1))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return (x + self.proj(attended)) * SKIP_SCALE


class ResBlock(nn.Module):
    """DDPM++ residual block, optionally resampling ("down"/"up") and followed by attention.

    `takes_skip` marks decoder blocks whose input is the running features concatenated with the
    matching encoder output; UNet.forward does the concatenation.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float,
                 resample: str = "none", attention: bool = False, takes_skip: bool = False):
        super().__init__()
        self.resample = resample
        self.takes_skip = takes_skip
        self.norm0 = group_norm(in_channels)
        self.conv0 = _conv(in_channels, out_channels, 3)
        self.emb_proj = _linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(out_channels, out_channels, 3, gain=0.0)
        needs_projection = in_channels != out_channels or resample != "none"
        self.skip = _conv(in_channels, out_channels, 1) if needs_projection else nn.Identity()
        self.attention = SelfAttention(out_channels) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(_resample(F.silu(self.norm0(x)), self.resample))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        x = (h + self.skip(_resample(x, self.resample))) * SKIP_SCALE
        return self.attention(x)


class UNet(nn.Module):
    """DDPM++ UNet: F(x, noise_labels) with output shape equal to the input's.

    img_resolution: input height = width; must be divisible by 2^(len(channel_mult) - 1).
    channel_mult: width of each resolution level as a multiple of model_channels; level i works at
        img_resolution / 2^i.
    num_blocks: residual blocks per level in the encoder (the decoder has num_blocks + 1, one per
        skip, as in DDPM++).
    attn_resolutions: resolutions (in pixels) whose blocks are followed by self-attention; each must
        be one of the levels, so that a preset used at the wrong resolution fails loudly instead of
        silently losing its attention.
    embedding_dim_mult: the noise embedding has model_channels * embedding_dim_mult features.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, model_channels: int,
                 channel_mult: Sequence[int], num_blocks: int, attn_resolutions: Sequence[int],
                 dropout: float, embedding_dim_mult: int = 4):
        super().__init__()
        levels = len(channel_mult)
        if img_resolution % 2 ** (levels - 1):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by "
                             f"2^{levels - 1} ({levels} levels)")
        resolutions = [img_resolution >> level for level in range(levels)]
        missing = sorted(set(attn_resolutions) - set(resolutions))
        if missing:
            raise ValueError(f"attention resolutions {missing} are not among the UNet's levels "
                             f"{resolutions}")
        emb_channels = model_channels * embedding_dim_mult
        block = dict(emb_channels=emb_channels, dropout=dropout)

        self.noise_embedding = SinusoidalEmbedding(model_channels)
        self.embedding_mlp = nn.Sequential(
            _linear(model_channels, emb_channels), nn.SiLU(),
            _linear(emb_channels, emb_channels), nn.SiLU())

        # Encoder; skip_channels records the width of every output the decoder will concatenate.
        width = model_channels  # the first block widens to model_channels * channel_mult[0]
        self.input_conv = _conv(in_channels, width, 3)
        skip_channels = [width]
        self.encoder = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            attention = resolutions[level] in attn_resolutions
            if level > 0:
                self.encoder.append(ResBlock(width, width, resample="down", **block))
                skip_channels.append(width)
            for _ in range(num_blocks):
                self.encoder.append(ResBlock(width, model_channels * mult, attention=attention,
                                             **block))
                width = model_channels * mult
                skip_channels.append(width)

        # Decoder: two blocks at the bottom (the first with attention, as in DDPM++), then per
        # level an up-sampling block (except at the bottom) and num_blocks + 1 blocks that each
        # consume one skip; DDPM++ puts attention only on the last of those.
        self.decoder = nn.ModuleList([ResBlock(width, width, attention=True, **block),
                                      ResBlock(width, width, **block)])
        for level, mult in reversed(list(enumerate(channel_mult))):
            if level < levels - 1:
                self.decoder.append(ResBlock(width, width, resample="up", **block))
            for index in range(num_blocks + 1):
                attention = index == num_blocks and resolutions[level] in attn_resolutions
                self.decoder.append(ResBlock(width + skip_channels.pop(), model_channels * mult,
                                             attention=attention, takes_skip=True, **block))
                width = model_channels * mult

        self.output_norm = group_norm(width)
        self.output_conv = _conv(width, out_channels, 3, gain=0.0)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor) -> torch.Tensor:
        # Inputs in the weights' dtype: a no-op for float32 weights (autocast casts per op), and what lets
        # a copy of the network in bfloat16 run without autocast (trainer/fused_denoiser.py's batched path).
        dtype = self.input_conv.weight.dtype
        emb = self.embedding_mlp(self.noise_embedding(noise_labels).to(dtype))
        h = self.input_conv(x.to(dtype))
        skips = [h]
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        for block in self.decoder:
            if block.takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.output_conv(F.silu(self.output_norm(h)))


def build_unet(preset: str, img_resolution: int, channels: int,
               dropout: float | None = None) -> UNet:
    """UNet from a named preset for `channels`-channel images; `dropout` overrides the preset's
    (e.g. more dropout when fine-tuning on a few hundred target images)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; presets: {', '.join(PRESETS)}")
    config = dict(PRESETS[preset])
    if dropout is not None:
        config["dropout"] = dropout
    return UNet(img_resolution=img_resolution, in_channels=channels, out_channels=channels, **config)
