"""p-values and Holm's step-down (evaluation/significance.py), by hand."""
import math

import pytest

from evaluation.significance import holm_adjusted, normal_p


def test_the_normal_p_value_by_hand():
    assert normal_p(1.959963984540054, 1.0) == pytest.approx(0.05, abs=1e-12)  # the 97.5% quantile
    assert normal_p(-3.0, 1.5) == normal_p(3.0, 1.5) == pytest.approx(math.erfc(2 / math.sqrt(2)), abs=1e-15)
    assert normal_p(0.0, 0.3) == 1.0
    assert normal_p(0.0, 0.0) == 1.0 and normal_p(0.25, 0.0) == 0.0  # no noise: equal, or certainly different
    with pytest.raises(ValueError, match="standard error"):
        normal_p(1.0, -0.1)


def test_holm_by_hand():
    """Sorted 1/128 (x 4), 1/64 (x 3), 1/32 (x 2), 1/16 (x 1, but never below the previous adjusted p); in the
    order given. Bonferroni would give 4/128, 4/64, 4/32, 4/16: Holm rejects at least as much."""
    p = [1 / 32, 1 / 128, 1 / 16, 1 / 64]
    adjusted = holm_adjusted(p)
    assert adjusted == [1 / 16, 1 / 32, 1 / 16, 3 / 64]
    assert all(a <= min(1.0, 4 * q) for a, q in zip(adjusted, p))
    assert holm_adjusted([0.4, 0.9]) == [0.8, 0.9] and holm_adjusted([0.6, 0.7]) == [1.0, 1.0]
    assert holm_adjusted([0.03]) == [0.03] and holm_adjusted([]) == []
