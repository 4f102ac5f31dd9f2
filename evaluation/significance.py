"""p-values of the report's paired differences, and Holm's step-down over a family of them (docs/METHODS.md §1c).

A difference d with a standard error se (the NLL's over held-out images, the Fréchet distance's over bootstrap
rounds taken in pairs) gets the two-sided normal p-value erfc(|d / se| / sqrt 2). For the Fréchet distance the
bootstrap's own quantiles would give a p-value too, but not below 2 / (rounds + 1): 0.01 at 200 rounds, which
Holm over ten tests could never bring under 5%; its standard error has no such floor.

Holm (1979): sort the m p-values, p_(1) <= ... <= p_(m); the adjusted p_(j) is max over i <= j of
min(1, (m - i + 1) p_(i)). Rejecting where the adjusted p is at most alpha holds the chance of any false
rejection in the family to alpha, whatever the dependence between the tests, and rejects at least what
Bonferroni (m p_(j)) rejects.
"""
import math
from typing import Sequence

from scipy import stats


def normal_p(difference: float, se: float) -> float:
    """Two-sided p-value of `difference` against 0 for an estimate with standard error `se`: 1 for a zero
    difference, 0 for a nonzero one without noise (se 0)."""
    if se < 0 or math.isnan(se) or math.isnan(difference):
        raise ValueError(f"need a difference and a standard error >= 0, got {difference} and {se}")
    if se == 0:
        return 1.0 if difference == 0 else 0.0
    return math.erfc(abs(difference) / se / math.sqrt(2))


def student_p(difference: float, se: float, dof: float) -> float:
    """Two-sided p-value of `difference` against 0 from Student's t with `dof` degrees of freedom (math.inf: the
    normal's), for a standard error estimated from few values (evaluation/replicates.py)."""
    p = normal_p(difference, se)  # its checks, and the answer for se 0 or infinite dof
    if se == 0 or math.isinf(dof):
        return p
    return float(2 * stats.t.sf(abs(difference) / se, dof))


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's adjusted p-values, in the order given."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
