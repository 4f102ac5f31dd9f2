"""Measurements made up with known answers (evaluation/measurements.py's schema), for the tests of the verdict,
the report and the sweep: no model is trained or sampled."""
import torch

from evaluation.comparison import comparisons
from evaluation.intervals import Interval
from evaluation.measurements import entry

# The reference's share of every bootstrap round, the same for every model (as the same reference resample is):
# two models with these rounds alone differ by exactly the difference of their values in every round.
SHARED = [-3.0, -1.0, 1.0, 3.0]


def model(nll: list[float] | None = None, fd: tuple = (10.0, 8.0, 12.0), copy_share: float = 0.0,
          nn: tuple[float, float] = (40.0, 40.0), loss: list[float] | None = None,
          own: list[float] | None = None, **more) -> dict:
    """An entry: per-image NLL values, the Fréchet distance (value, low, high; bounds None: no bootstrap
    rounds) whose rounds are value + SHARED (+ `own`, the model's own noise per round), the share of copies,
    the mean distances to the nearest training and held-out image (pixels=1: the distances are the RMS ones)."""
    rounds = None if fd[1] is None else [fd[0] + s + o for s, o in zip(SHARED, own or [0.0] * len(SHARED))]
    return entry("made up", fd=Interval(*fd), fd_rounds=rounds, kid=(0.5, 0.25), pixels=1,
                 copies={"copy_share": copy_share, "train_distance": nn[0], "held_out_distance": nn[1]},
                 nll=None if nll is None else torch.tensor(nll, dtype=torch.float64),
                 loss=None if loss is None else torch.tensor(loss, dtype=torch.float64), **more)


def measurements(models: dict[str, dict], floors: dict[str, dict] | None = None, barycenter: str = "fused-exact",
                 copy_threshold: float = 0.333, fd_metric: str = "fd_clf64", name: str = "digits",
                 sweep_n: int | None = None, best_auxiliary: str | None = None, replicate: int = 0,
                 router_calibration: list[dict] | None = None) -> dict:
    settings = {"held_out": "reference", "nll_images": 4, "nll_steps": 2, "nll_probes": 1, "test_draws_per_image": 2,
                "num_samples": 64, "extractor": "classifier", "fd_metric": fd_metric,
                "fd_classifier_metric": fd_metric, "fd_reference": "reference", "bootstrap": 5, "kid_subsets": 2,
                "kid_subset_size": 1000, "copy_threshold": copy_threshold, "copies_figures": "figures",
                "validation_share": 0.25,
                "fit_objective": "edm", "sgd_lr": 0.1, "sgd_momentum": 0.9, "sgd_epochs": 1}
    return {"run": {"name": name, "sweep_n": sweep_n, "replicate": replicate}, "barycenter": barycenter,
            "best_auxiliary": best_auxiliary,
            "class_names": ["0", "1"], "settings": settings,
            "reference": {"class_proportions": [0.5, 0.5], "classifier_tv": 0.01},
            "populations": [{"name": "target", "role": "target", "images": 16, "shards": 1, "mixture": [0.25, 0.75]}],
            "models": models, "floors": floors or {}, "comparisons": comparisons(models, barycenter, best_auxiliary),
            "router_calibration": router_calibration}


def plus(values: list[float], offsets: list[float]) -> list[float]:
    return [v + o for v, o in zip(values, offsets)]
