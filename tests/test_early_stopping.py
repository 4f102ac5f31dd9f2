"""Early stopping of the target-only baselines (stages/early_stopping.py) on a fake run (tests/test_distill.py's:
16 random 16x16 target images, three untrained tiny auxiliaries): a seeded split written once, the weights with
the lowest held-out loss kept across a restart, and a fine-tune that keeps the lowest of every loss it measured,
its start included, so it cannot end worse than the auxiliary it started from; and the SGD fit of lambda, which
trains on the same training part and keeps the lambda with the lowest held-out loss."""
import json

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from evaluation.run_report import notes
from evaluation.score_matching import held_out_loss
from shards.stream import read_population
from stages import fuse
from stages.catalogue import load_auxiliaries, load_fit
from shards.errors import ConfigError
from stages.config import load_config
from stages.context import StageContext
from stages.early_stopping import TRAINING_PART, BestWeights, split_target
from trainer.fused_denoiser import FusedDenoiser
from trainer.lambda_fit import accumulate_gram, objective_of
from stages.rundir import RunDir, finished_info
from stages.train_aux import model_meta
from tests import constructed_measurements as constructed
from tests.conftest import DIGITS
from tests.test_distill import fake_run
from trainer.export import load_denoiser

SHORT = ["train.batch=8", "data.workers=0", "fuse.finetune_kimg=0.048", "fuse.validation_every_kimg=0.016",
         "eval.test_draws_per_image=2", "train.log_every_kimg=0.016", "train.checkpoint_every_kimg=0.024",
         "train.eval_every_kimg=0", "train.snapshot_every_kimg=0"]


def context(root, *overrides) -> StageContext:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return StageContext.open(load_config(DIGITS, [f"root={root}", *SHORT, *overrides]))


def test_the_split_holds_out_a_seeded_quarter_and_writes_the_rest_once(tmp_path):
    fake_run(tmp_path)
    ctx = context(tmp_path)
    split = split_target(ctx)
    images, _ = read_population(ctx.run.data, "target")
    training, _ = read_population(split.data_dir, TRAINING_PART)
    assert len(split.indices) == 4 and split.training == len(training) == 12  # round(0.25 x 16)
    assert split.images.equal(images[split.indices])
    assert training.equal(images[[i for i in range(16) if i not in split.indices]])
    shard = split.data_dir / "shard-000000.tar"
    written = shard.stat().st_mtime_ns
    assert split_target(ctx).indices == split.indices and shard.stat().st_mtime_ns == written  # once
    assert split_target(context(tmp_path, "train.seed=1")).indices != split.indices
    assert split_target(context(tmp_path, "fuse.validation_share=0")) is None


def test_the_lowest_loss_is_kept_ties_keep_the_earlier_and_a_restart_goes_on_from_it(tmp_path):
    fake_run(tmp_path)
    ctx = context(tmp_path)
    stage = ctx.run.baseline("target-finetune")
    auxiliaries = list(load_auxiliaries(ctx.cfg).values())
    keep = BestWeights(ctx, stage, split_target(ctx), model_meta(ctx, TRAINING_PART))
    scripted = iter([0.5, 0.3, 0.3, 0.4])
    keep.loss = lambda denoiser: next(scripted)
    for step, denoiser in enumerate([auxiliaries[0], auxiliaries[1], auxiliaries[2], auxiliaries[0]]):
        keep.offer(denoiser, kimg=step / 10, step=step)
    assert keep.best == {"kimg": 0.1, "step": 1, "loss": 0.3}
    again = BestWeights(ctx, stage, keep.split, keep.meta)
    assert again.best == keep.best
    again.export(stage)
    kept, _ = load_denoiser(stage)
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), auxiliaries[1].state_dict().values()))


def test_a_fine_tune_keeps_the_lowest_loss_it_measured_never_worse_than_its_start(tmp_path):
    """6 steps of 8 images, measured at steps 2, 4 and 6, and before the first: the kept loss is the least of
    the four, the auxiliary's own loss on the held-out images (computed here) among them."""
    fake_run(tmp_path)
    ctx = context(tmp_path)
    cfg, e = ctx.cfg, ctx.cfg.edm
    fit = load_fit(cfg)
    auxiliaries = load_auxiliaries(cfg)
    stage = ctx.run.baseline("target-finetune")
    fuse.target_finetune(ctx, fit, auxiliaries, stage)
    split = split_target(ctx)
    start = float(held_out_loss(auxiliaries["aux-high"], split.images, split.indices, 2, e.p_mean, e.p_std,
                                e.sigma_data, seed=cfg.train.seed).mean())  # aux-high: the lowest vertex loss
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    measured = {row["step"]: row["validation_loss"] for row in rows if "validation_loss" in row}
    assert sorted(measured) == [2, 4, 6]
    kept = finished_info(stage)["early_stopping"]
    assert kept["loss"] == min(start, *measured.values()) <= start
    assert kept["step"] in (0, *measured) and (kept["held_out_images"], kept["training_images"]) == (4, 12)
    model, _ = load_denoiser(stage)
    best, _ = load_denoiser(RunDir.best_weights(stage))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), best.state_dict().values()))
    assert float(held_out_loss(model, split.images, split.indices, 2, e.p_mean, e.p_std, e.sigma_data,
                               seed=cfg.train.seed).mean()) == kept["loss"]


def test_the_sgd_fit_of_lambda_trains_on_the_training_part_and_keeps_the_lowest_held_out_loss(tmp_path):
    """4 epochs of the 12 training images, 8 a step: 6 steps, measured at the first step past each epoch's end
    (images 16, 24, 40, 48) and before the first. The held-out loss is the quadratic form of the held-out images' Gram statistics,
    so the kept lambda's loss, recomputed from statistics gathered here, is the least of those measured."""
    fake_run(tmp_path)
    ctx = context(tmp_path, "fuse.batch=8", "fuse.sgd_epochs=4", "fuse.draws_per_image=2")
    cfg = ctx.cfg
    auxiliaries = load_auxiliaries(cfg)
    uniform = FusedDenoiser(list(auxiliaries.values()), torch.full((3,), 1 / 3), names=list(auxiliaries))
    fit = fuse.fit_lambda(ctx, uniform, 16)
    kept = fit["sgd"]["early_stopping"]
    assert (kept["held_out_images"], kept["training_images"], fit["sgd"]["steps"]) == (4, 12, 6)
    rows = [json.loads(line) for line in (ctx.run.sgd_fit / "metrics.jsonl").read_text().splitlines()]
    measured = {row["step"]: row["validation_loss"] for row in rows if "validation_loss" in row}
    assert sorted(measured) == [2, 3, 5, 6]
    best = json.loads((RunDir.best_weights(ctx.run.sgd_fit) / "best.json").read_text())
    assert best["loss"] == kept["loss"] <= min(measured.values()) and fit["sgd"]["lambda"] == best["lambda"]
    split = split_target(ctx)
    objective = objective_of(cfg.fuse.objective, cfg.edm.p_mean, cfg.edm.p_std, cfg.edm.sigma_data)
    held_out = accumulate_gram(uniform, fuse.held_out_batches(split.images, 8, cfg.train.seed, 0, 1, "cpu"), 2,
                               objective)
    assert float(held_out.loss(torch.tensor(best["lambda"], dtype=torch.float64))) == kept["loss"]
    assert finished_info(ctx.run.sgd_fit)["early_stopping"] == kept


def test_patience_ends_a_fine_tune_once_its_lowest_loss_is_that_old_and_a_resume_ends_where_it_stopped(
        tmp_path, monkeypatch):
    """Measured every 2 steps of 8 images (0.016 kimg), scripted held-out losses: the lowest is the second
    measurement (step 4, 0.032 kimg); with fuse.patience_kimg=0.032 the fine-tune stops at step 8 of its cap of
    50, keeps step 4's weights, and checkpoints there. Run again without its done.json, it resumes from that
    checkpoint and ends at once, measuring nothing."""
    fake_run(tmp_path)
    ctx = context(tmp_path, "fuse.finetune_kimg=0.4", "fuse.patience_kimg=0.032")
    script = iter([0.5, 0.45, 0.4, 0.41, 0.42, 0.43, 0.44, 0.45, 0.46])
    monkeypatch.setattr(BestWeights, "loss", lambda self, denoiser: next(script))
    stage = ctx.run.baseline("target-finetune")
    fuse.target_finetune(ctx, load_fit(ctx.cfg), load_auxiliaries(ctx.cfg), stage)
    done = finished_info(stage)
    assert done["stopped_early"] and done["steps"] == 8 and done["kimg"] == 0.064
    assert {k: done["early_stopping"][k] for k in ("kimg", "step", "loss")} == {"kimg": 0.032, "step": 4, "loss": 0.4}
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "validation_loss" in row] == [2, 4, 6, 8]
    assert (stage / "checkpoints" / "ckpt-000000008").is_dir()

    (stage / "done.json").unlink()
    monkeypatch.setattr(BestWeights, "loss", lambda self, denoiser: pytest.fail("measured after the stop"))
    fuse.target_finetune(context(tmp_path, "fuse.finetune_kimg=0.4", "fuse.patience_kimg=0.032"),
                         load_fit(ctx.cfg), load_auxiliaries(ctx.cfg), stage)
    again = finished_info(stage)
    assert (again["steps"], again["kimg"], again["early_stopping"]) == (8, 0.064, done["early_stopping"])


def test_several_fine_tuning_rates_are_a_search_that_keeps_the_lowest_held_out_loss(tmp_path):
    """fuse.finetune_lr=[0.001,0.00001]: a fine-tune per rate in lr-<rate>/, and the baseline is the one whose
    kept weights have the lowest held-out loss, its weights, the rate and every rate's loss in its done.json."""
    fake_run(tmp_path)
    ctx = context(tmp_path, "fuse.finetune_lr=[0.001,0.00001]")
    stage = ctx.run.baseline("target-finetune")
    fuse.target_finetune(ctx, load_fit(ctx.cfg), load_auxiliaries(ctx.cfg), stage)
    tried = {rate: finished_info(RunDir.finetune_rate(stage, rate))["early_stopping"] for rate in (0.001, 0.00001)}
    chosen = min(tried, key=lambda rate: tried[rate]["loss"])
    done = finished_info(stage)
    assert done["early_stopping"] == {**tried[chosen], "learning_rate": chosen}
    assert done["learning_rates"] == {f"{rate:g}": {"loss": t["loss"], "kept_kimg": t["kimg"], "kimg": 0.048}
                                      for rate, t in tried.items()}
    model, _ = load_denoiser(stage)
    best, _ = load_denoiser(RunDir.finetune_rate(stage, chosen))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), best.state_dict().values()))


@pytest.mark.parametrize("overrides, message", [
    (["fuse.finetune_lr=[0.001,0.001]"], "fuse.finetune_lr must be distinct positive learning rates"),
    (["fuse.finetune_lr=[]"], "fuse.finetune_lr must be distinct positive learning rates"),
    (["fuse.finetune_lr=[0.001,0.0001]", "fuse.validation_share=0"], "choosing among rates needs held-out"),
])
def test_a_bad_rate_search_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, overrides)


def test_the_report_says_how_long_the_baselines_trained_and_which_rate_the_search_kept():
    kept = {"kimg": 3.0, "step": 24, "loss": 0.4, "held_out_images": 4, "training_images": 12, "learning_rate": 1e-4}
    m = constructed.measurements({"fused-exact": constructed.model([2.0] * 4),
                                  "target-finetune": constructed.model([2.1] * 4, early_stopping=kept)})
    m["settings"].update(patience_kimg=5.0, finetune_lr=[5e-4, 1e-4])
    note = next(line for line in notes(m) if line.startswith("kept kimg"))
    assert "until its lowest held-out loss is 5 kimg old (fuse.patience_kimg)" in note
    assert "target-finetune is the fine-tune with the lowest held-out loss of those at learning rates 0.0005, " \
           "0.0001: lr 0.0001." in note
    m["settings"].update(patience_kimg=0.0, finetune_lr=[5e-4])
    note = next(line for line in notes(m) if line.startswith("kept kimg"))
    assert "patience" not in note and "learning rates" not in note
