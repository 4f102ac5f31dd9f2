"""The verdict and the comparisons as functions of the measurements (evaluation/verdict.py,
evaluation/comparison.py), on made-up measurements whose answers are known: paired differences without noise
(p < 0.001), equal models (p = 1), a Fréchet difference lost in its own noise, the NLL's winner chosen on one
half of the images and tested on the other, and a family in which Holm's adjustment turns "better" into
"indistinguishable"."""
import math
import statistics

from evaluation import comparison
from evaluation.comparison import comparisons, decide, difference
from evaluation.verdict import verdict
from tests.constructed_measurements import measurements, model, plus

FUSED = [2.0, 2.2, 2.4, 2.6]  # mean 2.3, standard error 0.129; even-numbered images 2.0, 2.4, odd 2.2, 2.6
NOISY = [20.0, -20.0, -20.0, 20.0]  # a model's own bootstrap noise that drowns a Fréchet difference of ~1


def made_up() -> dict:
    """fused-exact is lower than every other model on NLL by a constant per image (paired: no noise) but for
    fused-uniform, which ties it (per-image differences ±0.2 about 0); distill (no NLL) has the lowest Fréchet
    distance, lower than every model but fused-mixture, whose rounds carry NOISY; distill copies."""
    return measurements({
        "aux/a": model(plus(FUSED, [3.0] * 4), fd=(30, 25, 35)),
        "aux/b": model(plus(FUSED, [0.3] * 4), fd=(12, 10, 14)),
        "fused-exact": model(FUSED, fd=(10, 8, 12)),
        "fused-uniform": model(plus(FUSED, [0.2, -0.2, 0.2, -0.2]), fd=(10, 8, 12)),
        "fused-mixture": model(plus(FUSED, [0.2] * 4), fd=(10.5, 9, 12), own=NOISY),
        "target-scratch": model(plus(FUSED, [1.0] * 4), fd=(20, 18, 22), copy_share=0.05),
        "target-finetune": model(plus(FUSED, [0.1] * 4), fd=(11, 9, 13)),
        "distill": model(None, fd=(9, 7, 11.5), copy_share=0.25, nn=(10.0, 30.0)),
    }, best_auxiliary="aux/b")


def test_the_verdict_of_made_up_measurements():
    """On the even-numbered images fused-exact is lowest (2.2) and target-finetune second (2.3; fused-uniform
    has 2.4 there, and ties fused-exact over all images): the runner-up tested on the odd-numbered images is
    target-finetune, 0.1 worse on each. 18 tests: 6 on NLL (the winner, five fusion pairs), 12 on the
    Fréchet distance (distill against 7 models, five pairs)."""
    lines = verdict(made_up())
    assert lines == [
        "Held-out NLL: fused-exact is lowest at 2.300 ± 0.129 bits/dim; chosen on the even-numbered held-out images, "
        "on the odd-numbered ones NLL fused-exact - target-finetune (the runner-up) = -0.100 ± 0.000 bits/dim paired "
        "(fused-exact lower, p < 0.001).",
        "Fréchet distance: distill is lowest at 9 [7, 11.5], and paired over bootstrap rounds lower than "
        "fused-exact, fused-uniform, target-finetune, aux/b, target-scratch, aux/a and indistinguishable from "
        "fused-mixture (chosen on the samples it is tested on, so its lead is optimistic).",
        "Fusion (fused-exact) against target-scratch: NLL difference -1.000 ± 0.000 bits/dim, paired (better, "
        "p < 0.001); Fréchet distance 10 [8, 12] vs 20 [18, 22], difference -10 [-10, -10] paired (better, "
        "p < 0.001).",
        "Fusion (fused-exact) against target-finetune: NLL difference -0.100 ± 0.000 bits/dim, paired (better, "
        "p < 0.001); Fréchet distance 10 [8, 12] vs 11 [9, 13], difference -1 [-1, -1] paired (better, p < 0.001).",
        "Fusion (fused-exact) against the best single auxiliary (aux/b, the lowest loss on the target images): NLL "
        "difference -0.300 ± 0.000 bits/dim, paired (better, p < 0.001); Fréchet distance 10 [8, 12] vs 12 [10, 14], "
        "difference -2 [-2, -2] paired (better, p < 0.001).",
        "Fusion (fused-exact) against the uniform ensemble (fused-uniform, lambda = 1/K): NLL difference "
        "+0.000 ± 0.115 bits/dim, paired (indistinguishable, p = 1.000); Fréchet distance 10 [8, 12] vs 10 [8, 12], "
        "difference +0 [0, 0] paired (indistinguishable, p = 1.000).",
        "Mixture fusion against the barycenter (fused-exact): NLL difference +0.200 ± 0.000 bits/dim, paired "
        "(worse, p < 0.001); Fréchet distance 10.5 [9, 12] vs 10 [8, 12], difference +0.5 [-19.5, 20.5] paired "
        "(indistinguishable, p = 1.000).",
        "Copying: distill (25% of samples are nearer than 0.33 x the second-nearest training image; 3.0x closer "
        "to training than to held-out images).",
        "How sure: the verdict makes 18 paired tests (6 on NLL, 12 on the Fréchet distance); each p above is "
        "Holm-adjusted over all of them, so the chance that any 'better', 'worse', 'lower' or 'higher' here is "
        "wrong is at most 5%.",
    ]


def test_a_clear_winner_no_copies_and_no_intervals():
    """Two models without bootstrap rounds: no Fréchet sentence, no Fréchet test. The winner's test is on the
    odd-numbered images (differences -1.1, -1.0: -1.05 ± 0.05), the fusion pair's on all (-1.0 ± 0.041)."""
    made = measurements({"fused-exact": model(FUSED, fd=(10, None, None), copy_share=0.04),
                         "target-scratch": model(plus(FUSED, [1.0, 1.1, 0.9, 1.0]), fd=(20, None, None),
                                                 copy_share=0.06)})
    assert verdict(made) == [
        "Held-out NLL: fused-exact is lowest at 2.300 ± 0.129 bits/dim; chosen on the even-numbered held-out images, "
        "on the odd-numbered ones NLL fused-exact - target-scratch (the runner-up) = -1.050 ± 0.050 bits/dim paired "
        "(fused-exact lower, p < 0.001).",
        "Fusion (fused-exact) against target-scratch: NLL difference -1.000 ± 0.041 bits/dim, paired (better, "
        "p < 0.001).",
        "No model copies its training images: at most 6% of samples (target-scratch) pass the ratio test.",
        "How sure: the verdict makes 2 paired tests (2 on NLL, 0 on the Fréchet distance); each p above is "
        "Holm-adjusted over all of them, so the chance that any 'better', 'worse', 'lower' or 'higher' here is "
        "wrong is at most 5%.",
    ]
    assert verdict(measurements({})) == []


def test_comparisons_pair_each_fused_model_with_each_baseline_and_control_then_the_mixture_with_the_barycenter():
    made = made_up()
    assert [(c["model"], c["against"]) for c in made["comparisons"]] == [
        (fused, against) for fused in ("fused-exact", "fused-mixture")
        for against in ("target-scratch", "target-finetune", "aux/b", "fused-uniform")] + [
        ("fused-mixture", "fused-exact")]
    hybrid = measurements({**made["models"], "fused-hybrid": model(plus(FUSED, [0.1] * 4))}, best_auxiliary="aux/b")
    assert [(c["model"], c["against"]) for c in hybrid["comparisons"]][-3:] == [
        ("fused-mixture", "fused-exact"), ("fused-hybrid", "fused-mixture"), ("fused-hybrid", "fused-exact")]
    assert len(hybrid["comparisons"]) == len(made["comparisons"]) + 2  # an ablation: no baseline pairs of its own
    models = made["models"]
    scratch = difference(models["fused-exact"], models["target-scratch"])
    assert abs(scratch["nll_difference"]["mean"] + 1.0) < 1e-12 and scratch["fd_difference"]["value"] == -10
    noisy = difference(models["fused-mixture"], models["fused-exact"])["fd_difference"]
    assert abs(noisy["se"] - math.sqrt(4 * 20 ** 2 / 3)) < 1e-12  # the rounds' differences 0.5 ± 20
    assert abs(noisy["p"] - math.erfc(0.5 / noisy["se"] / math.sqrt(2))) < 1e-15
    assert difference(models["distill"], models["fused-exact"])["nll_difference"] is None


def test_holm_turns_a_lone_significant_difference_indistinguishable_in_a_family_of_three():
    """Per-image differences d ± 0.1 (standard error 0.1 / sqrt 3) with d / se = 2.2: p = erfc(2.2 / sqrt 2) =
    0.028, "better" as the only test; against three baselines with the same differences Holm multiplies the
    smallest p by 3 (0.083 > 0.05), and none is."""
    se = 0.1 / math.sqrt(3)
    offsets = [2.2 * se + e for e in (0.1, -0.1, 0.1, -0.1)]
    p = math.erfc(2.2 / math.sqrt(2))
    assert 0.027 < p < 0.028
    alone = comparisons({"fused-exact": model(FUSED, fd=(10, None, None)),
                         "target-scratch": model(plus(FUSED, offsets), fd=(10, None, None))}, "fused-exact", None)
    assert [c["nll"] for c in alone] == ["better"]
    assert abs(alone[0]["nll_difference"]["p_holm"] - p) < 1e-12
    three = comparisons({"fused-exact": model(FUSED, fd=(10, None, None)),
                         **{b: model(plus(FUSED, offsets), fd=(10, None, None))
                            for b in ("target-scratch", "target-finetune", "checkpoint-merge")}}, "fused-exact", None)
    assert [c["nll"] for c in three] == ["indistinguishable"] * 3
    assert all(abs(c["nll_difference"]["p_holm"] - 3 * p) < 1e-12 for c in three)


def test_a_family_is_decided_over_both_metrics():
    """decide() adjusts the NLL's and the Fréchet distance's p-values together and leaves its input alone."""
    family = [{"model": "a", "against": "b", "nll_difference": {"mean": -1.0, "se": 0.5, "p": 1 / 128},
               "fd_difference": {"value": 2.0, "low": 1.0, "high": 3.0, "se": 0.5, "p": 3 / 64}},
              {"model": "a", "against": "c", "nll_difference": None,
               "fd_difference": {"value": -2.0, "low": -3.0, "high": -1.0, "se": 0.5, "p": 1 / 32}}]
    decided = decide(family)
    # sorted 1/128, 1/32, 3/64: 3 x 1/128 = 3/128, 2 x 1/32 = 1/16, max(1/16, 1 x 3/64) = 1/16
    assert [decided[0]["nll_difference"]["p_holm"], decided[0]["fd_difference"]["p_holm"],
            decided[1]["fd_difference"]["p_holm"]] == [3 / 128, 1 / 16, 1 / 16]
    assert (decided[0]["nll"], decided[0]["fd"], decided[1]["nll"], decided[1]["fd"]) == \
        ("better", "indistinguishable", None, "indistinguishable")
    assert "p_holm" not in family[0]["nll_difference"] and "nll" not in family[0]


def test_the_nll_winner_is_tested_on_images_it_was_not_chosen_on():
    """target-scratch is 0.1 above fused-exact on the even-numbered images and 0.1 below on the odd-numbered
    ones: fused-exact is chosen (on the even ones), and the test on the odd ones finds it higher, which a test on
    the images it was chosen on could not."""
    made = measurements({"fused-exact": model(FUSED, fd=(10, None, None)),
                         "target-scratch": model(plus(FUSED, [0.1, -0.1, 0.1, -0.1]), fd=(10, None, None))})
    assert verdict(made)[0] == (
        "Held-out NLL: fused-exact is lowest at 2.300 ± 0.129 bits/dim; chosen on the even-numbered held-out images, "
        "on the odd-numbered ones NLL fused-exact - target-scratch (the runner-up) = +0.100 ± 0.000 bits/dim paired "
        "(fused-exact higher, p < 0.001).")


def test_class_tv_is_compared_in_pairs_over_the_bootstrap_rounds():
    """The mixture gets the classes right (TV 0 to the held-out proportions), the barycenter does not (0.2): over
    the same rounds their difference is -0.2 give or take the rounds' own wobble, a test of the family, and a
    part of the verdict's line."""
    half = {"reference_classes": [0.5, 0.5]}
    models = {"fused-exact": model(FUSED, classes=[0.7, 0.3], class_tv_rounds=[0.21, 0.19, 0.22, 0.18], **half),
              "fused-mixture": model(FUSED, classes=[0.5, 0.5], class_tv_rounds=[0.01, 0.0, 0.02, 0.0], **half)}
    made = measurements(models)
    (c,) = made["comparisons"]
    assert (c["model"], c["against"], c["tv"]) == ("fused-mixture", "fused-exact", "better")
    d = c["tv_difference"]
    assert abs(d["value"] + 0.2) < 1e-12 and abs(d["se"] - statistics.stdev([-0.2, -0.19, -0.2, -0.18])) < 1e-12
    assert comparison.tests_in(made["comparisons"]) == {"nll": 1, "fd": 1, "tv": 1}
    line = next(line for line in verdict(made) if line.startswith("Mixture fusion against the barycenter"))
    assert "class TV 0 [" in line and "vs 0.2 [" in line and "difference -0.200 [" in line and "(better, " in line
