"""ScoreFusion's fused denoiser D_lambda(x; sigma) = sum_i lambda_i(sigma) D_i(x; sigma), and checkpoint merging.

Because the weights sum to one, fusing denoisers is the same as fusing scores
(s = (D - x) / sigma^2 is affine in D), so sampling the KL barycenter of the auxiliaries is running the
ordinary sampler on D_lambda (docs/METHODS.md §1). The weights are checked to sum to one but may be
negative: the sum-to-one optimum without the sign constraint (trainer/lambda_fit.py) is a useful
diagnostic model too. lambda is one vector for every sigma (the paper) or piecewise constant over
sigma bins (one vector per bin, a natural extension).

Known subtlety, kept on purpose: with auxiliaries of unequal variances the reverse process driven by
sum_i lambda_i s_i is not exactly the sigma = 0 barycenter; that is the paper's method.

Checkpoint merging (`merge_weights`) averages parameters instead of outputs: a different model, the
SDXL baseline of the paper.
"""
import copy
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from shards.errors import ModelError
from trainer.edm import common_sigma_range

SUM_TOLERANCE = 1e-5  # a softmax in float32 sums to one within ~1e-7


def check_weights(weights, num_models: int) -> torch.Tensor:
    """Weights as a float64 [bins, K] tensor (a [K] vector is one bin), finite, each row summing to one."""
    weights = torch.as_tensor(weights, dtype=torch.float64).detach().clone()
    if weights.dim() == 1:
        weights = weights[None]
    if weights.dim() != 2 or weights.shape[1] != num_models:
        raise ModelError(f"weights must have shape [{num_models}] or [bins, {num_models}], "
                          f"got {list(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ModelError(f"weights are not finite: {weights.tolist()}")
    sums = weights.sum(dim=1)
    if ((sums - 1).abs() > SUM_TOLERANCE).any():
        # D-fusion equals score fusion only for weights summing to one
        raise ModelError(f"each weight vector must sum to one, got sums {sums.tolist()}")
    return weights


def architecture_difference(models: Sequence[nn.Module]) -> str | None:
    """None if the models are the same network up to the values of their tensors, else the first
    difference found. Same means: the same module tree (names and types), the same parameters and
    buffers (names, shapes, dtypes), and the same plain settings of every submodule (ints, floats,
    strings... such as Denoiser.sigma_data or Dropout.p), which the tensors alone would not reveal."""
    def signature(model: nn.Module):
        tensors = [(n, tuple(t.shape), t.dtype) for n, t in
                   [*model.named_parameters(), *model.named_buffers()]]
        modules = []
        for name, module in model.named_modules():
            settings = {k: v for k, v in vars(module).items()
                        if not k.startswith("_") and k != "training"
                        and isinstance(v, (bool, int, float, str, tuple, type(None)))}
            modules.append((name, type(module).__name__, sorted(settings.items(), key=lambda kv: kv[0])))
        return tensors, modules

    reference = signature(models[0])
    for index, model in enumerate(models[1:], start=1):
        other = signature(model)
        for kind, ref, got in zip(("tensors", "modules"), reference, other):
            if ref != got:
                first = next((f"{a} vs {b}" for a, b in zip(ref, got) if a != b),
                             f"{len(ref)} vs {len(got)} entries")
                return f"model 0 and model {index} differ in their {kind}: {first}"
    return None


class FusedDenoiser(nn.Module):
    """D_lambda(x; sigma) = sum_i lambda_i(sigma) D_i(x; sigma), with the call signature of
    trainer.edm.Denoiser (x [B, C, H, W]; sigma a number, [B] or [B, 1, 1, 1]); the result is float32.

    weights: [K] (one lambda for every sigma) or [bins, K] with `sigma_edges` (bins - 1 increasing
        values; bin j covers [edges[j-1], edges[j]), the first and last bins are open-ended).
    names: how errors name the auxiliaries (default "auxiliary <i>").
    batched: evaluate the K networks in one torch.func.vmap call (True; they must share an architecture),
        in a Python loop (False), or (None) batched on CUDA only, where one call of K stacked networks
        launches K times fewer kernels (bench/gpu_check.py measures it); on CPU the vmapped convolutions
        (grouped convolutions with per-model weights) were slower than the loop. Both paths run on any
        device, so the tests check one against the other on the CPU. vmap's batched convolutions bypass
        autocast, so under autocast the batched path runs a copy of the stacked weights in the autocast
        dtype (normalisation layers included, where autocast would keep some in float32) and casts the
        inputs of its convolutions and linear layers to it: it agrees with the loop at that dtype's precision.

    The auxiliaries are frozen in place (eval mode, requires_grad False) and stay in eval mode under
    .train(), so that dropout never makes D_i random.

    Exactness: where lambda(sigma) is a one-hot e_j, the output is D_j's bit for bit. When every
    sample of a call falls on the same e_j (always so in the sampler, which calls with one sigma)
    only model j runs; in a call that mixes one-hot and other rows, a one-hot row takes model j's
    row of `all_outputs`, which the batched path computes equal to a lone call of D_j only up to
    float rounding. Selecting rather than computing 1.0 * D_j + 0.0 * D_i also keeps a non-finite
    D_i from leaking into a row that does not use it.

    An auxiliary that exposes `image_shape` (C, H, W) is checked against the others at
    construction, and the fused model exposes it too; trainer.edm.Denoiser does not (a UNet runs at any resolution), so image-size
    mismatches between such auxiliaries must be caught from their model.json. The sigmas the fused model is
    valid at (`sigma_range`) are the intersection of those its auxiliaries declare (a pretrained discrete-time
    model declares its table's; trainer/pretrained.py), when any does. Channel mismatches
    and failing auxiliaries are reported by name at the first call.
    """

    def __init__(self, denoisers: Sequence[nn.Module], weights, sigma_edges=None,
                 names: Sequence[str] | None = None, batched: bool | None = None):
        super().__init__()
        if len(denoisers) == 0:
            raise ModelError("no auxiliary denoisers to fuse")
        self.names = list(names) if names is not None else [f"auxiliary {i}" for i in range(len(denoisers))]
        if len(self.names) != len(denoisers):
            raise ModelError(f"{len(self.names)} names for {len(denoisers)} denoisers")
        shape = _common_image_shape(denoisers, self.names)
        if shape is not None:
            self.image_shape = shape
        self.denoisers = nn.ModuleList(denoisers)
        self.denoisers.eval().requires_grad_(False)
        weights = check_weights(weights, len(denoisers))
        self.register_buffer("weights", weights)
        self.register_buffer("sigma_edges", _check_edges(sigma_edges, weights.shape[0]))
        try:
            valid = common_sigma_range(denoisers)
        except ValueError as error:
            raise ModelError(f"{', '.join(self.names)}: {error}") from None
        if valid is not None:
            self.sigma_range = valid  # pretrained members are valid on their tables only: fused, on the intersection
        sigma_data = {getattr(d, "sigma_data", None) for d in denoisers}
        # for trainer.edm.denoising_loss; None when the auxiliaries disagree (then pass it explicitly)
        self.sigma_data = sigma_data.pop() if len(sigma_data) == 1 else None
        difference = architecture_difference(denoisers)
        if batched and difference is not None:
            raise ModelError(f"batched evaluation needs auxiliaries of one architecture: {difference}")
        self.same_architecture = difference is None
        self.batched = batched
        self._stacked = None  # ((device, dtype), stacked tensors, meta-device template), built on first use

    @property
    def num_models(self) -> int:
        return len(self.denoisers)

    @property
    def networks_per_call(self) -> int:
        """Networks one call at one sigma runs (as in the sampler), the most over the sigma bins: 1 where
        that bin's lambda is one-hot (forward runs only that model), else K."""
        return 1 if bool(_one_hot(self.weights).all()) else self.num_models

    @property
    def num_bins(self) -> int:
        return self.weights.shape[0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.denoisers.eval()
        return self

    def bin_index(self, sigma, batch: int) -> torch.Tensor:
        """The sigma bin of each sample, int64 [batch]."""
        sigma = torch.as_tensor(sigma, device=self.weights.device).to(torch.float64).reshape(-1)
        sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
        if self.sigma_edges is None:
            return torch.zeros(batch, dtype=torch.long, device=sigma.device)
        return torch.bucketize(sigma, self.sigma_edges, right=True)

    def weights_for(self, sigma, batch: int) -> torch.Tensor:
        """lambda(sigma) of each sample, float64 [batch, K]."""
        return self.weights[self.bin_index(sigma, batch)]

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        lam = self.weights_for(sigma, x.shape[0])
        one_hot = _one_hot(lam)
        chosen = lam.argmax(dim=1)
        if one_hot.all() and (chosen == chosen[0]).all():
            return self.run_one(int(chosen[0]), x, sigma)
        outputs = self.all_outputs(x, sigma)
        lam = lam.to(device=outputs.device, dtype=outputs.dtype)
        fused = (lam.T[:, :, None, None, None] * outputs).sum(dim=0)
        selected = outputs[chosen.to(outputs.device), torch.arange(x.shape[0], device=outputs.device)]
        return torch.where(one_hot.to(outputs.device)[:, None, None, None], selected, fused)

    def weighted_networks(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, list[Callable]]:
        """D_lambda(x; sigma) as sum_k weights[:, k] D_k(x): (weights float64 [B, n] on x's device, the n
        networks with a nonzero weight for some sample, each as x -> D_k(x; sigma) float32), so that a caller
        can run them one at a time (evaluation/likelihood.py differentiates one network's graph and frees it
        before the next). lambda depends on sigma alone: the weights carry no gradient."""
        lam = self.weights_for(sigma, x.shape[0])
        used = (lam != 0).any(dim=0).nonzero().flatten().tolist()
        return lam[:, used].to(x.device), [partial(self.run_one, i, sigma=sigma) for i in used]

    def uses_batched(self, device: torch.device) -> bool:
        batched = self.batched if self.batched is not None else device.type == "cuda" and self.same_architecture
        return batched and self.num_models > 1

    def all_outputs(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Every auxiliary's D_i(x; sigma), float32 [K, B, C, H, W]."""
        if self.uses_batched(x.device):
            return self._run_batched(x, sigma)
        return torch.stack([self.run_one(i, x, sigma) for i in range(self.num_models)])

    def _apply(self, fn, *args, **kwargs):
        self._stacked = None  # .to(), .cpu(), .half() ...: the stacked copy would stay behind on the old device
        return super()._apply(fn, *args, **kwargs)

    def run_one(self, index: int, x: torch.Tensor, sigma) -> torch.Tensor:
        """D_index(x; sigma), float32, its failures named."""
        try:
            output = self.denoisers[index](x, sigma)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            raise ModelError(f"{self.names[index]} failed on input of shape {list(x.shape)}: "
                              f"{type(error).__name__}: {error}") from error
        if output.shape != x.shape:
            raise ModelError(f"{self.names[index]} returned shape {list(output.shape)} for input "
                              f"{list(x.shape)}; the auxiliaries must model the target's image shape")
        return output.to(torch.float32)

    def _run_batched(self, x: torch.Tensor, sigma) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        key = (self.weights.device, dtype)
        if self._stacked is None or self._stacked[0] != key:
            # One copy of all K models' tensors, stacked along a new leading dim (in the autocast dtype
            # under autocast, see the class docstring).
            params, buffers = stack_module_state(list(self.denoisers))
            tensors = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                       for k, v in {**params, **buffers}.items()}
            template = copy.deepcopy(self.denoisers[0]).to("meta")
            for module in template.modules():
                if isinstance(module, nn.GroupNorm):
                    # vmap's group_norm cannot ask an input laid out otherwise whether it is contiguous, and
                    # diffusers' attention hands the next block a transposed view
                    module.register_forward_pre_hook(_contiguous_input)
            if dtype is not None:
                # Ops that autocast keeps in float32 (CUDA's: group_norm, upsampling) hand the next layer a
                # float32 input, which a vmapped convolution, bypassing autocast, refuses with weights in
                # `dtype`: cast it as autocast would.
                for module in template.modules():
                    if isinstance(module, (nn.Conv2d, nn.Linear)):
                        module.register_forward_pre_hook(_input_to_weight_dtype)
            self._stacked = (key, tensors, template)
        _, tensors, template = self._stacked

        def one_model(model_tensors, x, sigma):
            return functional_call(template, model_tensors, (x, sigma))

        # The math attention kernel is made of ops vmap batches; the fused kernels have no batching rule
        # and would run once per model.
        with sdpa_kernel(SDPBackend.MATH):
            return vmap(one_model, in_dims=(0, None, None))(tensors, x, sigma).to(torch.float32)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def merge_weights(denoisers: Sequence[nn.Module], lam) -> dict[str, torch.Tensor]:
    """Checkpoint merging: the state_dict sum_i lam_i theta_i over parameters and floating-point
    buffers (summed in float64, stored in each tensor's own dtype); other buffers must be equal in
    every model and are copied. lam is one vector [K] summing to one; a one-hot lam returns model j's
    tensors exactly. Needs identical architectures (ModelError otherwise)."""
    if len(denoisers) == 0:
        raise ModelError("no models to merge")
    lam = check_weights(lam, len(denoisers))
    if lam.shape[0] != 1:
        raise ModelError(f"checkpoint merging takes one weight vector, got {lam.shape[0]}")
    lam = lam[0]
    difference = architecture_difference(denoisers)
    if difference is not None:
        raise ModelError(f"cannot merge checkpoints of different architectures: {difference}")
    states = [d.state_dict() for d in denoisers]
    nonzero = lam.nonzero().flatten()
    if len(nonzero) == 1 and lam[nonzero[0]] == 1:
        return {k: v.detach().clone() for k, v in states[int(nonzero[0])].items()}
    merged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = sum(float(w) * s[key].to(torch.float64) for w, s in zip(lam, states))
            merged[key] = total.to(first.dtype)
        else:
            if any(not torch.equal(first, s[key]) for s in states[1:]):
                raise ModelError(f"cannot merge non-float buffer {key!r}: it differs between models")
            merged[key] = first.detach().clone()
    return merged


def _one_hot(weights: torch.Tensor) -> torch.Tensor:
    """Which rows of weights [rows, K] are a vertex e_j of the simplex, bool [rows]."""
    return (weights == 1).any(dim=1) & ((weights == 0).sum(dim=1) == weights.shape[1] - 1)


def _common_image_shape(denoisers: Sequence[nn.Module], names: list[str]) -> tuple | None:
    """The (C, H, W) every auxiliary that exposes one models; None when none does."""
    shapes = [(name, tuple(d.image_shape)) for name, d in zip(names, denoisers) if hasattr(d, "image_shape")]
    for name, shape in shapes[1:]:
        if shape != shapes[0][1]:
            raise ModelError(f"{name} models images of shape {shape} but {shapes[0][0]} of "
                              f"{shapes[0][1]}; all auxiliaries must model the target's image shape")
    return shapes[0][1] if shapes else None


def _check_edges(sigma_edges, num_bins: int) -> torch.Tensor | None:
    if sigma_edges is None:
        if num_bins != 1:
            raise ModelError(f"{num_bins} weight vectors need {num_bins - 1} sigma_edges")
        return None
    edges = torch.as_tensor(sigma_edges, dtype=torch.float64).detach().clone().reshape(-1)
    if edges.numel() != num_bins - 1:
        raise ModelError(f"{num_bins} weight vectors need {num_bins - 1} sigma_edges, got {edges.numel()}")
    if not torch.isfinite(edges).all() or (edges <= 0).any() or (edges.diff() <= 0).any():
        raise ModelError(f"sigma_edges must be positive, finite and increasing, got {edges.tolist()}")
    return edges
