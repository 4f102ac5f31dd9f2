"""How sure is each number of the report: intervals for the Fréchet distance and for the difference of two
models' Fréchet distances (paired bootstrap rounds), KID over subsets, standard errors of per-image means and of
paired per-image differences.

A data-scarce target has a reference set of a few hundred images, so the reference's own noise is a large part
of any difference between two models; the intervals here resample it too. All randomness comes from
shards.seeds, so the same features and seed give the same interval.
"""
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from evaluation.features import frechet, frechet_float64
from shards.seeds import Stream, generator, seed_of

# Bootstrap round r of frechet_interval draws from the words (seed, Stream.BOOTSTRAP, r), r = 0, 1, ...; KID's
# subsets use this word instead, which no round reaches, so the two never share a seed.
KID_WORD = 2**32 - 1

Distance = Callable[[torch.Tensor, torch.Tensor], float]  # two feature sets [N, D], [M, D] -> their distance


class Interval(NamedTuple):
    value: float  # the statistic on the full sets
    low: float
    high: float


def frechet_interval(sample_features: torch.Tensor, reference_features: torch.Tensor, rounds: int, seed: int,
                     level: float = 0.95, method: str = "centered", distance: Distance = frechet) -> Interval:
    """(value, low, high): the Fréchet distance of the full sets and a bootstrap interval at `level`, as
    bootstrap_interval(distance(samples, reference), [bootstrap_round(..., r) for r < rounds]); the report
    computes the same pieces spread over the ranks. `distance`: frechet_on(the features' device).

    Each round resamples BOTH sets with replacement, so a small reference set's noise is in the interval.
    Round r draws from shards.seeds.generator(seed, Stream.BOOTSTRAP, r), the reference indices first: two
    models evaluated with the same seed and reference see the same reference resamples, whatever their N, and
    with the same N the same sample indices too, so their rounds pair up (paired_rounds_interval).

    The Fréchet distance of finite sets is biased upwards (by about the value two sets from one distribution
    give), and a resample, which repeats points, is biased about as much again. So with D comparable to the
    set sizes the "percentile" interval lies entirely ABOVE the value (D = 64, 300 vs 300 Gaussians of one
    law: value 7.7, interval [13.2, 15.4]). "basic" reflects the quantiles about the value,
    [2 value - q_high, 2 value - q_low], which removes that bias to first order: it aims at the distance of the
    two laws (there [-0.04, 2.1], covering the true 0) and may go below 0. Over 20 such draws (true distance
    0, and 5.76 with a shifted mean) the percentile interval covered the true distance 0 times, the basic
    one 17-18 times. Neither interval need contain the value; both are about 2x wider than the spread over
    independent draws. "centered" (the default, the report's) puts the bootstrap's spread around the value,
    [value - (q_mid - q_low), value + (q_high - q_mid)]: an interval for the sampling noise of the value itself,
    its bias left in. That bias is about the same for every model measured with the same N, M and reference,
    which is what the report compares, and a reader sees the value inside its interval.

    Cost per round, one core: a covariance of each resample (N D^2) and torch-fidelity's eigenvalues of a
    D x D product (a general, non-symmetric eig). D = 64: 200 rounds take 0.2 s at N = M = 300, 1.3 s at
    N = 10,000. D = 2048 (Inception): 3-4 s for the eigenvalues plus 1 s (N = 10,000) to 5 s (N = 50,000)
    for the covariance, i.e. 200 rounds at N = 50,000 take about half an hour; on shared cores keep BLAS to
    one thread (OMP_NUM_THREADS=1), a contended 2-thread eig was 4-10x slower. On a GPU, frechet_float64.
    """
    _check_settings(rounds, level, method)
    draws = [bootstrap_round(sample_features, reference_features, seed, r, distance) for r in range(rounds)]
    return bootstrap_interval(distance(sample_features, reference_features), draws, level, method)


def frechet_on(device) -> Distance:
    """The Fréchet distance computed where features on `device` are: torch-fidelity's own on the CPU (the
    report's numbers are torch-fidelity's), frechet_float64 on an accelerator."""
    return frechet if torch.device(device).type == "cpu" else frechet_float64


def bootstrap_round(sample_features: torch.Tensor, reference_features: torch.Tensor, seed: int, r: int,
                    distance: Distance = frechet) -> float:
    """The distance of round r's resamples of both sets (frechet_interval): the same value on any rank."""
    if len(sample_features) < 2 or len(reference_features) < 2:
        raise ValueError(f"need at least 2 samples and 2 reference features for a covariance, got "
                         f"{len(sample_features)} and {len(reference_features)}")
    g = generator(seed, Stream.BOOTSTRAP, r)
    reference_rows = torch.randint(len(reference_features), (len(reference_features),), generator=g)
    sample_rows = torch.randint(len(sample_features), (len(sample_features),), generator=g)
    return distance(sample_features[sample_rows.to(sample_features.device)],
                    reference_features[reference_rows.to(reference_features.device)])


def bootstrap_interval(value: float, draws: Sequence[float], level: float = 0.95,
                       method: str = "centered") -> Interval:
    """The interval of frechet_interval from the full sets' value and the rounds' draws, in round order."""
    _check_settings(len(draws), level, method)
    low, middle, high = np.quantile(draws, [(1 - level) / 2, 0.5, (1 + level) / 2])
    if method == "basic":
        low, high = 2 * value - high, 2 * value - low
    elif method == "centered":
        low, high = value - (middle - low), value + (high - middle)
    return Interval(value, float(low), float(high))


def _check_settings(rounds: int, level: float, method: str) -> None:
    if rounds < 1 or not 0 < level < 1:
        raise ValueError(f"need rounds >= 1 and 0 < level < 1, got rounds={rounds}, level={level}")
    if method not in ("centered", "percentile", "basic"):
        raise ValueError(f"method must be 'centered', 'percentile' or 'basic', got {method!r}")


def kernel_distance(sample_features: torch.Tensor, reference_features: torch.Tensor, subsets: int,
                    subset_size: int, seed: int) -> tuple[float, float]:
    """(mean, std) of KID over `subsets` random subsets: torch-fidelity's unbiased MMD^2 with the cubic
    polynomial kernel (x.y / D + 1)^3, whose expectation does not depend on the subset size (unlike FID's bias).

    `subset_size` is capped at the smaller set's size (a reference of a few hundred images cannot give subsets
    of torch-fidelity's default 1000); at the cap every subset of that set is all of it. Each subset is drawn
    without replacement. std is the spread of ONE subset's estimate (np.std, as torch-fidelity and the papers
    report it), not the standard error of the mean, which is smaller but hard to state since subsets overlap.

    torch-fidelity draws the subsets from np.random.RandomState(rng_seed), rng_seed defaulting to the constant
    2020; it is set here from (seed, Stream.BOOTSTRAP, KID_WORD), reduced to the 32 bits RandomState takes.
    """
    size = min(subset_size, len(sample_features), len(reference_features))
    if size < 2 or subsets < 1:
        raise ValueError(f"need subsets >= 1 and at least 2 features per set, got subsets={subsets}, "
                         f"sizes {len(sample_features)} and {len(reference_features)}, subset_size={subset_size}")
    metric = kid_features_to_metric(sample_features.detach().cpu(), reference_features.detach().cpu(),
                                    kid_subsets=subsets, kid_subset_size=size, verbose=False,
                                    rng_seed=seed_of(seed, Stream.BOOTSTRAP, KID_WORD) % 2**32)
    return metric[KEY_METRIC_KID_MEAN], metric[KEY_METRIC_KID_STD]


def mean_se(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-image values (a loss, a likelihood), the images independent."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(x) < 2:
        raise ValueError(f"need at least 2 values for a standard error, got {len(x)}")
    return float(x.mean()), float(x.std(correction=1) / len(x) ** 0.5)


def paired_difference(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """(mean of a - b, its standard error) for two models measured on the SAME images and draws (a[i] and b[i]
    share image i's noise). The shared part cancels, so this is much tighter than comparing two mean_se's."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return mean_se(a - b)


def paired_rounds_interval(value_a: float, draws_a: Sequence[float], value_b: float, draws_b: Sequence[float],
                           level: float = 0.95, method: str = "centered") -> tuple[Interval, float]:
    """(the interval of a - b, its standard error) for two statistics bootstrapped in pairs: round r of each
    from the same resample (for the Fréchet distance: the same reference rows, and the same sample indices,
    whose samples share their latents). What the two rounds share cancels in their difference: the reference
    set's noise, which dominates each model's own interval on a small target, and much of the samples'. The
    interval is bootstrap_interval's of value_a - value_b over the rounds' differences; the standard error is
    their standard deviation (evaluation/significance.py takes its p-value from it)."""
    if len(draws_a) != len(draws_b):
        raise ValueError(f"paired rounds need as many rounds on each side, got {len(draws_a)} and {len(draws_b)}")
    differences = np.asarray(draws_a, dtype=np.float64) - np.asarray(draws_b, dtype=np.float64)
    se = float(differences.std(ddof=1)) if len(differences) > 1 else 0.0
    return bootstrap_interval(value_a - value_b, differences.tolist(), level, method), se
