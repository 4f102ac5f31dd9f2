"""The verdict and the comparisons as functions of the measurements (evaluation/verdict.py,
evaluation/comparison.py), on made-up measurements whose answers are known: a clear NLL winner, an
indistinguishable pair, overlapping and separated Fréchet intervals, a model that copies."""
from evaluation.comparison import compare
from evaluation.verdict import verdict
from tests.constructed_measurements import measurements, model, plus

FUSED = [2.0, 2.2, 2.4, 2.6]  # mean 2.3, standard error 0.129


def made_up() -> dict:
    """fused-exact beats target-scratch by 1.0 bits/dim (paired se 0.041) and is within 0.005 ± 0.012 of
    target-finetune; fused-mixture is 0.2 ± 0.020 worse than fused-exact; distill (no NLL) has the lowest
    Fréchet distance and copies a quarter of its samples."""
    return measurements({
        "aux/a": model(plus(FUSED, [3.0] * 4), fd=(30, 25, 35)),
        "fused-exact": model(FUSED, fd=(10, 8, 12)),
        "fused-mixture": model(plus(FUSED, [0.2, 0.25, 0.15, 0.2]), fd=(10.5, 9, 12)),
        "target-scratch": model(plus(FUSED, [1.0, 1.1, 0.9, 1.0]), fd=(20, 18, 22), copy_share=0.05),
        "target-finetune": model(plus(FUSED, [0.02, -0.02, 0.03, -0.01]), fd=(11, 9, 13)),
        "distill": model(None, fd=(9, 7, 11.5), copy_share=0.25, nn=(10.0, 30.0)),
    })


def test_the_verdict_of_made_up_measurements():
    assert verdict(made_up()) == [
        "Held-out NLL: fused-exact is lowest at 2.300 ± 0.129 bits/dim; NLL fused-exact - target-finetune = "
        "-0.005 ± 0.012 bits/dim paired (indistinguishable).",
        "Fréchet distance: distill is lowest at 9 [7, 11.5], indistinguishable (overlapping 95% intervals) from "
        "fused-exact, fused-mixture, target-finetune.",
        "Fusion (fused-exact) against target-scratch: NLL difference -1.000 ± 0.041 bits/dim, paired (better); "
        "Fréchet distance 10 [8, 12] vs 20 [18, 22] (better).",
        "Fusion (fused-exact) against target-finetune: NLL difference -0.005 ± 0.012 bits/dim, paired "
        "(indistinguishable); Fréchet distance 10 [8, 12] vs 11 [9, 13] (indistinguishable).",
        "Mixture fusion against the barycenter (fused-exact): NLL difference +0.200 ± 0.020 bits/dim, paired "
        "(worse); Fréchet distance 10.5 [9, 12] vs 10 [8, 12] (indistinguishable).",
        "Copying: distill (25% of samples are nearer than 0.33 x the second-nearest training image; 3.0x closer "
        "to training than to held-out images).",
    ]


def test_a_clear_winner_no_copies_and_no_intervals():
    """Two models, the runner-up clearly worse; nobody copies; without bootstrap rounds there is no Fréchet
    sentence and no Fréchet relation."""
    made = measurements({"fused-exact": model(FUSED, fd=(10, None, None), copy_share=0.04),
                         "target-scratch": model(plus(FUSED, [1.0, 1.1, 0.9, 1.0]), fd=(20, None, None),
                                                 copy_share=0.06)})
    assert verdict(made) == [
        "Held-out NLL: fused-exact is lowest at 2.300 ± 0.129 bits/dim; NLL fused-exact - target-scratch = "
        "-1.000 ± 0.041 bits/dim paired (fused-exact lower than target-scratch).",
        "Fusion (fused-exact) against target-scratch: NLL difference -1.000 ± 0.041 bits/dim, paired (better).",
        "No model copies its training images: at most 6% of samples (target-scratch) pass the ratio test.",
    ]
    assert verdict(measurements({})) == []


def test_comparisons_pair_each_fused_model_with_each_baseline_then_the_mixture_with_the_barycenter():
    made = made_up()
    assert [(c["model"], c["against"]) for c in made["comparisons"]] == [
        ("fused-exact", "target-scratch"), ("fused-exact", "target-finetune"),
        ("fused-mixture", "target-scratch"), ("fused-mixture", "target-finetune"), ("fused-mixture", "fused-exact")]
    models = made["models"]
    scratch = compare(models["fused-exact"], models["target-scratch"])
    assert scratch["nll"] == "better" and scratch["fd"] == "better"
    assert abs(scratch["nll_difference"]["mean"] + 1.0) < 1e-12
    assert abs(scratch["nll_difference"]["se"] - (0.02 / 3) ** 0.5 / 2) < 1e-12  # sd of (0, .1, -.1, 0) over 2
    reverse = compare(models["target-scratch"], models["fused-exact"])
    assert (reverse["nll"], reverse["fd"]) == ("worse", "worse")
    assert compare(models["distill"], models["fused-exact"]) == {"nll_difference": None, "nll": None,
                                                                 "fd": "indistinguishable"}
