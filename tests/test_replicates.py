"""Pooling over replicates (evaluation/replicates.py) by hand, and the sweep's replicates: each another draw of
the n target images in a run directory of its own, their comparisons pooled in the summary."""
import json
import math

import pytest

from evaluation.measurements import write_measurements
from evaluation.replicates import pooled, pooled_comparison
from shards.errors import ConfigError
from shards.seeds import Stream, seed_of
from stages import sweep as sweep_stage
from stages.config import load_config, sweep_member
from stages.rundir import RunDir
from tests.conftest import DIGITS
from tests.constructed_measurements import measurements, model, plus

FUSED = [2.0, 2.2, 2.4, 2.6]


def test_pooled_by_hand():
    """Replicates 1 and 3 with standard errors 0.3 and 0.4: mean 2, the spread's variance 2 over 2 replicates,
    plus the mean squared standard error (0.09 + 0.16) / 2: se = sqrt(1 + 0.125). One replicate: its own."""
    mean, se, dof = pooled([1.0, 3.0], [0.3, 0.4])
    assert mean == 2.0 and se == pytest.approx(math.sqrt(1.125), abs=1e-15)
    assert dof == pytest.approx(1.125 ** 2 * 1 / 1.0 ** 2)  # Welch-Satterthwaite: (1 + 0.125)^2 (R - 1) / 1^2
    assert pooled([1.5], [0.25]) == (1.5, 0.25, math.inf)
    with pytest.raises(ValueError, match="one standard error per replicate"):
        pooled([1.0, 2.0], [0.1])
    difference = pooled_comparison([{"nll_difference": {"mean": -1.0, "se": 0.0, "p": 0.0}, "fd_difference": None},
                                    {"nll_difference": {"mean": -0.6, "se": 0.0, "p": 0.0}, "fd_difference": None}])
    assert difference["fd_difference"] is None
    nll = difference["nll_difference"]  # -0.8 ± sqrt(0.08 / 2) = 0.2: t = 4 on R - 1 = 1 degree of freedom
    assert nll["mean"] == pytest.approx(-0.8) and nll["se"] == pytest.approx(0.2) and nll["replicates"] == 2
    assert nll["dof"] == pytest.approx(1.0)
    assert nll["p"] == pytest.approx(1 - 2 / math.pi * math.atan(4))  # Student's t with 1 dof is Cauchy's


def test_three_replicates_get_students_t_on_two_degrees_of_freedom_not_the_normal():
    """Differences 1.0, 1.2, 1.4 without image noise: se = 0.2 / sqrt 3, t = 6 sqrt 3 on 2 degrees of freedom,
    whose two-sided p is 1 - t / sqrt(t^2 + 2) in closed form: 0.009, where the normal would say 1e-25."""
    tests = [{"nll_difference": {"mean": d, "se": 0.0}, "fd_difference": {"value": d, "se": 0.1}}
             for d in (1.0, 1.2, 1.4)]
    nll = pooled_comparison(tests)["nll_difference"]
    t = 1.2 / (0.2 / math.sqrt(3))
    assert nll["dof"] == pytest.approx(2.0) and nll["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert nll["p"] > 100 * math.erfc(t / math.sqrt(2))
    fd = pooled_comparison(tests)["fd_difference"]  # the images' noise counted too: more degrees of freedom
    between, within = 0.04 / 3, 0.01
    assert fd["dof"] == pytest.approx((between + within) ** 2 * 2 / between ** 2)


def test_a_replicate_is_another_draw_of_the_target_in_a_directory_of_its_own(tmp_path):
    cfg = load_config(DIGITS, [f"root={tmp_path}", "sweep.replicates=3"])
    member = sweep_member(cfg, 16, 2)
    assert member.data.target.seed == seed_of(cfg.data.target.seed, Stream.REPLICATE, 2) and member.data.target.count == 16
    assert sweep_member(cfg, 16, 0).data.target.seed == cfg.data.target.seed  # replicate 0 is the run's own draw
    assert member.data.reference == cfg.data.reference and member.data.aux == cfg.data.aux
    assert RunDir.of(member).root == RunDir.of(cfg).sweep / "n16-r2"
    assert RunDir.of(sweep_member(cfg, 16)).root == RunDir.of(cfg).sweep / "n16"
    again = load_config(DIGITS, [f"root={tmp_path}", "sweep.replicates=3", "sweep.n=16", "sweep.replicate=2"])
    assert again.data.target == member.data.target and RunDir.of(again).root == RunDir.of(member).root
    with pytest.raises(ConfigError, match="sweep.replicate=3: the sweep has sweep.replicates=3"):
        load_config(DIGITS, ["sweep.replicates=3", "sweep.n=16", "sweep.replicate=3"])


def test_the_summary_pools_the_replicates(tmp_path):
    """Two replicates at n = 8: fused-exact is 1.0 below target-scratch on every image in one and 0.6 in the
    other: pooled -0.8 ± 0.2, t = 4 on one degree of freedom (p = 0.16 before Holm), so not yet better; each
    replicate's best auxiliary is another one, pooled as "the best auxiliary" (ties in both). The NLL table's
    cell is the replicates' mean ± standard deviation."""
    cfg = load_config(DIGITS, [f"root={tmp_path}", "sweep.sizes=[8]", "sweep.replicates=2"])
    for replicate, (gap, best) in enumerate([(1.0, "aux/a"), (0.6, "aux/b")]):
        made = measurements({"aux/a": model(FUSED), "aux/b": model(FUSED), "fused-exact": model(FUSED),
                             "target-scratch": model(plus(FUSED, [gap] * 4), fd=(20.0, 18.0, 22.0))},
                            sweep_n=8, best_auxiliary=best, replicate=replicate)
        write_measurements(RunDir.of(sweep_member(cfg, 8, replicate)).measurements, made)
    sweep_stage.summarise(cfg)
    sweep = RunDir.of(cfg).sweep
    md = (sweep / "sweep.md").read_text()
    assert "- fused-exact against target-scratch on held-out NLL (paired): indistinguishable at n = 8.\n" in md
    assert "- fused-exact against the best auxiliary on held-out NLL (paired): indistinguishable at n = 8.\n" in md
    assert "Each n has 2 replicates" in md
    data = json.loads((sweep / "sweep.json").read_text())["data"]
    assert data["replicates"] == 2
    scratch = next(row for row in data["comparisons"]["8"] if row["against"] == "target-scratch")
    assert scratch["NLL difference"] == pytest.approx({"mean": -0.8, "se": 0.2})
    assert data["metrics"]["NLL bits/dim"]["target-scratch"]["8"] == pytest.approx(
        {"mean": 2.3 + 0.8, "std": math.sqrt(0.08)})
    assert (sweep / "nll.png").is_file() and (sweep / "fd.png").is_file()
