"""The `eval` section of the run config."""
from dataclasses import dataclass
from typing import Optional

from shards.ranges import at_least, choice, positive, within, zero_or_more

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads for FID


@dataclass
class EvalSpec:
    # auto: Inception (FID) where its weights are (inception_weights, or torch-fidelity's cached download),
    # else the feature classifier trained on the auxiliaries' labels (offline, the digits).
    extractor: str = choice("auto", "inception", "classifier")
    inception_weights: Optional[str] = None  # local weights-inception-2015-12-05-6726825d.pth
    num_samples: int = at_least(2, 2000)  # samples per model in `scorefuse evaluate`
    # The population the Fréchet distance and KID compare samples with; null: data.reference (the held-out
    # images of the target mixture). The papers' FID-50k compares with the 50,000 training images instead.
    fd_reference: Optional[str] = None
    batch: int = positive(256)     # images per batch of feature extraction and held-out loss
    test_draws_per_image: int = positive(16)  # (sigma, noise) draws per held-out image of the held-out loss
    # Images per sampler call. Samples are computed in groups aligned to their indices (image i with the
    # images of group i // sample_batch), so image i does not depend on how the work is cut into chunks or
    # spread over processes; a network's floating-point rounding does depend on its batch's shape, so
    # changing sample_batch may change the last bit of a sample.
    sample_batch: int = positive(256)
    grid_images: int = positive(64)
    # Autocast of every sampler that feeds a measurement (evaluate, the periodic Fréchet distance, grids):
    # no (float32) | bf16. One setting, so a model's FD is measured at one precision during and after training.
    sample_precision: str = choice("no", "bf16")
    # Negative log-likelihood by the probability-flow ODE (evaluation/likelihood.py) on held-out images.
    nll_images: int = zero_or_more(200, "off")  # held-out reference images it is measured on
    nll_steps: int = at_least(1, 64)  # Heun steps of the ODE (64: within ~0.01 bits/dim of the exact integral)
    nll_probes: int = zero_or_more(1, "exact trace")  # Rademacher probes of the Hutchinson trace estimator per image
    # Step doubling: the first this many NLL images also at 2 x nll_steps (the same draws), for each model's
    # discretisation error, extrapolated (Heun's error falls as steps^-2); 0: off.
    nll_doubling_images: int = zero_or_more(16, "off")
    # Images per NLL batch (evaluate, and the likelihood check of fuse): autograd keeps one network's graph per
    # image, about 111 MiB for EDM's DDPM++ at 32x32 and 289 MiB at 64x64; 16 fits any GPU.
    nll_batch: int = positive(16)
    # Uncertainty (evaluation/intervals.py) and memorisation (evaluation/memorisation.py).
    bootstrap: int = zero_or_more(200, "off")  # bootstrap rounds of the Fréchet distance's 95% interval
    kid_subsets: int = positive(100)  # KID: mean and std over this many subsets ...
    kid_subset_size: int = at_least(2, 1000)  # ... of this size (capped at the smaller set)
    # a sample copies its nearest training image when d1 < threshold x d2
    copy_threshold: float = within("(0, 1)", 0.333)
