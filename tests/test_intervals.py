"""Uncertainty of the report's comparisons: Fréchet bootstrap intervals, KID, standard errors, the verdict."""
import math

import numpy as np
import pytest
import torch

from evaluation.features import frechet as frechet_distance, frechet_float64
from evaluation.intervals import (bootstrap_round, frechet_interval, frechet_on, kernel_distance, mean_se,
                                  paired_difference, paired_rounds_interval)


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift():
    """Equal covariances leave only |mu_1 - mu_2|^2: an exact answer for torch-fidelity's formula."""
    a = gaussian(200, 8, seed=0)
    shift = torch.arange(8.0) / 4
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n, m, d", [(300, 200, 16), (40, 50, 64)])  # the second: singular covariances
def test_the_accelerators_frechet_distance_is_torch_fidelitys(n, m, d):
    """frechet_float64 (symmetric eigendecompositions, for GPUs) against torch-fidelity's general eig: within
    1e-7 of the covariances' traces (torch-fidelity's means are float32); selected by the device."""
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(2)) / d ** 0.5
    a, b = gaussian(n, d, seed=0, shift=0.3) @ mixing, gaussian(m, d, seed=1) @ mixing.T
    scale = float(torch.cov(a.T).trace() + torch.cov(b.T).trace())
    assert frechet_float64(a, b) == pytest.approx(frechet_distance(a, b), abs=1e-7 * scale)
    assert frechet_float64(a, a) == pytest.approx(0.0, abs=1e-7 * scale)
    got = frechet_interval(a, b, rounds=20, seed=0, distance=frechet_float64)
    assert got == pytest.approx(frechet_interval(a, b, rounds=20, seed=0), abs=1e-7 * scale)
    assert frechet_on("cpu") is frechet_distance and frechet_on(torch.device("cuda", 1)) is frechet_float64


def test_interval_contains_the_value_when_the_mean_shift_dominates():
    a, b = gaussian(400, 4, seed=0, shift=1.0), gaussian(400, 4, seed=1)
    interval = frechet_interval(a, b, rounds=200, seed=0)
    assert interval.value == frechet_distance(a, b)
    assert interval.low < interval.value < interval.high


def test_interval_narrows_with_more_samples():
    small = frechet_interval(gaussian(100, 4, 0, 1.0), gaussian(100, 4, 1), rounds=200, seed=0)
    large = frechet_interval(gaussian(1600, 4, 0, 1.0), gaussian(1600, 4, 1), rounds=200, seed=0)
    assert large.high - large.low < (small.high - small.low) / 2


def test_reference_noise_is_in_the_interval():
    """The same samples against a 40-image and a 4000-image reference: only the small reference is noisy."""
    samples = gaussian(4000, 4, seed=0, shift=1.0)
    few = frechet_interval(samples, gaussian(40, 4, seed=1), rounds=200, seed=0)
    many = frechet_interval(samples, gaussian(4000, 4, seed=1), rounds=200, seed=0)
    assert few.high - few.low > 3 * (many.high - many.low)


def test_interval_is_a_function_of_the_seed():
    a, b = gaussian(300, 8, seed=0, shift=0.5), gaussian(200, 8, seed=1)
    assert frechet_interval(a, b, rounds=50, seed=3) == frechet_interval(a, b, rounds=50, seed=3)
    assert frechet_interval(a, b, rounds=50, seed=3) != frechet_interval(a, b, rounds=50, seed=4)


def test_percentile_interval_carries_the_bias_and_basic_removes_it():
    """D = 64, 300 vs 300 points of one law (true distance 0), the example of frechet_interval's docstring."""
    a, b = gaussian(300, 64, seed=0), gaussian(300, 64, seed=1)
    percentile = frechet_interval(a, b, rounds=200, seed=0, method="percentile")
    basic = frechet_interval(a, b, rounds=200, seed=0, method="basic")
    assert percentile.value > 5 and percentile.low > percentile.value
    assert basic.value == percentile.value and basic.high < percentile.low
    assert basic.low < 0.1 * basic.value  # reflected about the value: near the true distance 0
    centered = frechet_interval(a, b, rounds=200, seed=0)
    assert centered.low < centered.value < centered.high  # the default: the spread around the value
    assert centered.high - centered.low == pytest.approx(percentile.high - percentile.low)


def test_interval_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_interval(gaussian(1, 4, 0), gaussian(10, 4, 1), rounds=10, seed=0)
    with pytest.raises(ValueError, match="method"):
        frechet_interval(gaussian(10, 4, 0), gaussian(10, 4, 1), rounds=10, seed=0, method="bca")


def test_kid_is_near_zero_for_one_law_and_positive_for_a_shift():
    reference = gaussian(500, 16, seed=1)
    same_mean, same_std = kernel_distance(gaussian(500, 16, seed=0), reference, subsets=20, subset_size=200, seed=0)
    shifted_mean, shifted_std = kernel_distance(gaussian(500, 16, 0, 0.5), reference, subsets=20, subset_size=200,
                                                seed=0)
    assert abs(same_mean) < 2 * same_std
    assert shifted_mean > 10 * shifted_std > 0


def test_kid_at_the_capped_subset_size_is_the_unbiased_cubic_mmd_of_the_full_sets():
    """subset_size 1000 is capped at 60, so every subset is a whole set: the hand-computed MMD^2, std 0."""
    x, y = gaussian(60, 5, seed=0).double(), gaussian(60, 5, seed=1, shift=0.3).double()
    kernel = lambda u, v: (u @ v.T / 5 + 1) ** 3
    off_diagonal = lambda k: (k.sum() - k.trace()) / (60 * 59)
    expected = off_diagonal(kernel(x, x)) + off_diagonal(kernel(y, y)) - 2 * kernel(x, y).mean()
    mean, std = kernel_distance(x, y, subsets=3, subset_size=1000, seed=0)
    assert mean == pytest.approx(float(expected), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_a_function_of_the_seed():
    a, b = gaussian(300, 8, seed=0), gaussian(300, 8, seed=1)
    assert kernel_distance(a, b, 10, 100, seed=5) == kernel_distance(a, b, 10, 100, seed=5)
    assert kernel_distance(a, b, 10, 100, seed=5) != kernel_distance(a, b, 10, 100, seed=6)


def test_mean_se_by_hand():
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)  # sample variance (2.25 + 0.25) * 2 / 3, over sqrt(4)
    with pytest.raises(ValueError, match="at least 2"):
        mean_se([1.0])


def test_paired_difference_by_hand_and_tighter_than_unpaired():
    a, b = [3.0, 5.0, 4.0, 8.0], [2.0, 5.0, 3.0, 6.0]  # positively correlated: image 4 is hard for both
    difference, se = paired_difference(a, b)
    assert difference == 1.0  # differences 1, 0, 1, 2
    assert se == pytest.approx(math.sqrt(2 / 3) / 2)
    assert se < math.hypot(mean_se(a)[1], mean_se(b)[1])
    with pytest.raises(ValueError, match="same shape"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])


def test_paired_rounds_by_hand():
    """Rounds a = (1, 2, 3, 5), b = (0, 2, 2, 3): differences (1, 0, 1, 2), standard deviation sqrt(2/3); the
    centred interval of value 0.5 is bootstrap_interval's of those differences."""
    interval, se = paired_rounds_interval(2.5, [1.0, 2.0, 3.0, 5.0], 2.0, [0.0, 2.0, 2.0, 3.0])
    assert interval.value == 0.5 and se == pytest.approx(math.sqrt(2 / 3))
    low, middle, high = np.quantile([1.0, 0.0, 1.0, 2.0], [0.025, 0.5, 0.975])
    assert (interval.low, interval.high) == pytest.approx((0.5 - (middle - low), 0.5 + (high - middle)))
    with pytest.raises(ValueError, match="as many rounds"):
        paired_rounds_interval(1.0, [1.0, 2.0], 1.0, [1.0])


def test_a_difference_the_overlapping_intervals_miss_is_found_in_paired_rounds():
    """Samples of two models from the same 1000 latents z in D = 8: a = z, b = z + 0.5 in every coordinate, so
    their Fréchet distances to a reference differ by 8 x 0.5^2 = 2 plus twice the shift times the gap between
    the means of z and the reference (the part of the reference's noise that the shift interacts with, which
    does not cancel). Against a 20-image reference, whose noise makes each interval several units wide, the two
    95% intervals overlap; in the paired rounds (the same reference rows and sample indices in each round) the
    rest of that noise cancels, and the difference's interval excludes 0."""
    z = gaussian(1000, 8, seed=0)
    reference = gaussian(20, 8, seed=1)
    a, b = z, z + 0.5
    ia, ib = frechet_interval(a, reference, rounds=200, seed=0), frechet_interval(b, reference, rounds=200, seed=0)
    assert ia.high > ib.low and ib.high > ia.low  # overlapping: "indistinguishable" by the overlap rule
    draws_a = [bootstrap_round(a, reference, 0, r) for r in range(200)]
    draws_b = [bootstrap_round(b, reference, 0, r) for r in range(200)]
    difference, se = paired_rounds_interval(ia.value, draws_a, ib.value, draws_b)
    assert difference.value == pytest.approx(ia.value - ib.value)
    assert difference.high < 0  # b is farther, and the paired rounds say so
    unpaired = math.hypot(float(np.std(draws_a, ddof=1)), float(np.std(draws_b, ddof=1)))
    assert abs(difference.value) > 2.5 * se and se < unpaired  # pairing shrinks the standard error
