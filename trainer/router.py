"""The router of mixture fusion (trainer/mixture.py): a noise-conditional classifier that tells which auxiliary
population a noised image came from.

It sees what the denoisers see: x = x0 + sigma n, the input scaled by c_in
and sigma embedded as c_noise = ln(sigma) / 4, through the DDPM++ blocks of trainer/unet.py (a UNet's encoder,
globally pooled, then a linear layer to K logits). Trained by cross-entropy on the K auxiliary populations in
equal shares (class priors rho_i = 1/K), its softmax estimates rho_i p_i(x; sigma) / sum_j rho_j p_j(x; sigma),
so its logits are log p_i(x; sigma) up to a constant per sample: what the mixture's posterior weights need.
Its sigma is log-uniform over the sampler's whole range, not EDM's log-normal training law: the mixture asks it
for weights at every sampler step, and under the log-normal 7% of the likelihood ODE's steps (those below
sigma 0.01) would fall where it had hardly seen a sample.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from shards.seeds import generator, normal
from trainer.export import ROUTER_FILES, read_model, write_model
from trainer.unet import PRESETS, ResBlock, SinusoidalEmbedding, _conv, _linear, group_norm


class Router(nn.Module):
    """(x [B, C, H, W], sigma [B]) -> logits [B, K]."""

    def __init__(self, img_resolution: int, channels: int, classes: int, preset: str = "tiny",
                 sigma_data: float = 0.5):
        super().__init__()
        config = PRESETS[preset]
        width, mults = config["model_channels"], config["channel_mult"]
        emb_channels = width * 4
        self.sigma_data = sigma_data
        self.noise_embedding = SinusoidalEmbedding(width)
        self.embedding_mlp = nn.Sequential(_linear(width, emb_channels), nn.SiLU(), _linear(emb_channels, emb_channels),
                                           nn.SiLU())
        self.input_conv = _conv(channels, width, 3)
        blocks, levels = [], len(mults)
        if img_resolution % 2 ** (levels - 1):
            raise ValueError(f"the router needs a resolution divisible by {2 ** (levels - 1)}, got {img_resolution}")
        for level, mult in enumerate(mults):  # the UNet's encoder: one block per level, downsampling between
            if level > 0:
                blocks.append(ResBlock(width, width, emb_channels, 0.0, resample="down"))
            blocks.append(ResBlock(width, config["model_channels"] * mult, emb_channels, 0.0))
            width = config["model_channels"] * mult
        self.blocks = nn.ModuleList(blocks)
        self.output_norm = group_norm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        emb = self.embedding_mlp(self.noise_embedding(sigma.log() / 4))
        h = self.input_conv(x.to(torch.float32) * c_in[:, None, None, None])
        for block in self.blocks:
            h = block(h, emb)
        return self.head(F.silu(self.output_norm(h)).mean(dim=(2, 3))).to(torch.float32)


def router_loss(router: nn.Module, x0: torch.Tensor, labels: torch.Tensor, sigma_min: float,
                sigma_max: float) -> torch.Tensor:
    """Cross-entropy of the population labels of clean images x0 after noise, ln(sigma) uniform on
    [ln sigma_min, ln sigma_max] (from the global RNG, seeded per rank and checkpointed, as in the diffusion
    stage)."""
    sigma = log_uniform_sigma(x0.shape[0], sigma_min, sigma_max, x0.device)
    noised = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
    return F.cross_entropy(router(noised, sigma), labels)


def log_uniform_sigma(batch: int, sigma_min: float, sigma_max: float, device) -> torch.Tensor:
    """[batch] noise levels with ln(sigma) uniform on [ln sigma_min, ln sigma_max], from the global RNG."""
    low, high = math.log(sigma_min), math.log(sigma_max)
    return (low + (high - low) * torch.rand(batch, device=device)).exp()


@torch.no_grad()
def calibration(router: nn.Module, batches, sigma_min: float, sigma_max: float, bands: int, seed: int,
                bins: int = 10) -> list[dict]:
    """How far the router's posteriors can be trusted at each noise level: `batches` of (clean images x0,
    population labels) noised with ln(sigma) uniform on [ln sigma_min, ln sigma_max] (batch i's draws from
    generator(seed, i)), cut into `bands` equal parts of ln sigma. Per band: the images, the cross-entropy in nats
    (ln K is chance), the accuracy, and the expected calibration error over `bins` bins."""
    low, high = math.log(sigma_min), math.log(sigma_max)
    log_sigmas, losses, tops, hits = [], [], [], []
    for index, (x0, labels) in enumerate(batches):
        draws = generator(seed, index)  # on the CPU: the same draws whatever device the router is on
        log_sigma = low + (high - low) * torch.rand(x0.shape[0], generator=draws, device=draws.device)
        sigma = log_sigma.exp().to(x0.device)
        log_q = torch.log_softmax(router(x0 + sigma[:, None, None, None] * normal(x0.shape, draws, x0.device),
                                         sigma).double(), dim=1)
        top, guess = log_q.exp().max(dim=1)
        log_sigmas.append(log_sigma)
        losses.append(-log_q.gather(1, labels[:, None]).squeeze(1).cpu())
        tops.append(top.cpu())
        hits.append((guess == labels).double().cpu())
    log_sigma, loss, top, hit = (torch.cat(t) for t in (log_sigmas, losses, tops, hits))
    band = ((log_sigma - low) / (high - low) * bands).long().clamp(0, bands - 1)
    rows = []
    for b in range(bands):
        inside = band == b
        measured = bool(inside.any())
        rows.append({"sigma_low": math.exp(low + (high - low) * b / bands),
                     "sigma_high": math.exp(low + (high - low) * (b + 1) / bands), "images": int(inside.sum()),
                     "cross_entropy": float(loss[inside].mean()) if measured else None,
                     "accuracy": float(hit[inside].mean()) if measured else None,
                     "ece": expected_calibration_error(top[inside], hit[inside], bins) if measured else None})
    return rows


def expected_calibration_error(top: torch.Tensor, hit: torch.Tensor, bins: int = 10) -> float:
    """Over `bins` equal bins of the top posterior `top`, the sum of each bin's share of the images times |the
    bin's accuracy (mean of `hit`) - its mean top posterior|: 0 for a calibrated classifier."""
    which = (top * bins).long().clamp(max=bins - 1)
    return sum(float((which == j).double().mean()) * abs(float(hit[which == j].mean() - top[which == j].mean()))
               for j in range(bins) if (which == j).any())


@torch.no_grad()
def log_density_ratios(router: nn.Module, x0: torch.Tensor, sigma: float, draws: int,
                       generator: torch.Generator) -> torch.Tensor:
    """log r_i(x0) = log of the router's posterior over its prior, at a small `sigma`, averaged over `draws`
    noise draws (the router was trained on noised images), [N, K] float64: what EM fits pi on. With equal
    training shares the prior is uniform, a constant that EM ignores."""
    sigmas = torch.full((x0.shape[0],), sigma, device=x0.device)
    posteriors = [torch.softmax(router(x0 + sigma * torch.randn(x0.shape, generator=generator,
                                                                   device=generator.device).to(x0.device), sigmas)
                                .to(torch.float64), dim=1) for _ in range(draws)]
    return torch.stack(posteriors).mean(dim=0).clamp(min=1e-300).log() + math.log(router.head.out_features)


def save_router(directory, router: Router, meta: dict) -> None:
    write_model(directory, router, meta, *ROUTER_FILES)


def load_router(directory) -> Router:
    """The trained router of a run (eval mode, no grad)."""
    state, meta = read_model(directory, *ROUTER_FILES, "router", "run `scorefuse fuse` (fuse.mixture=true) first")
    router = Router(meta["image_size"], meta["channels"], meta["classes"], meta["preset"], meta["sigma_data"])
    router.load_state_dict(state)
    return router.eval().requires_grad_(False)
