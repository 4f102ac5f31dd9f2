"""The `eval` section of the run config."""
from dataclasses import dataclass
from typing import Optional


@dataclass
class EvalSpec:
    # auto: the digit classifier for the embedded digits, Inception (FID) for everything else.
    extractor: str = "auto"        # auto | inception | digit-classifier
    inception_weights: Optional[str] = None  # local pt_inception-2015-12-05-6726825d.pth
    num_samples: int = 2000        # samples per model in `scorefuse evaluate`
    batch: int = 256
    grid_images: int = 64
