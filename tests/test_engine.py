"""The engine on a toy problem where every number is known: accumulation, skipped steps, EMA, LR,
checkpoint rotation and the fall-back from a truncated checkpoint."""
import itertools
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from trainer.checkpoint import CheckpointError
from trainer.ema import ema_beta
from trainer.engine import Engine, TrainingError, Update, lr_at
from trainer.spec import TrainSpec


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def regression_batches(batch, seed=0):
    """Fixed micro-batches of y = 3x - 1 (a pure function of the index, like the shard stream)."""
    def batches(start):
        for i in itertools.count(start):
            g = torch.Generator().manual_seed(seed * 100003 + i)
            x = torch.randn(batch, 4, generator=g)
            yield x, x.sum(1, keepdim=True) * 3 - 1
    return batches


def mse(modules, batch):
    x, y = batch
    return ((modules["net"](x) - y) ** 2).mean()


def make_engine(tmp_path, accum=1, batch=8, loss=mse, **spec_kw):
    spec = TrainSpec(batch=batch, accum=accum, lr=0.05, lr_rampup_kimg=0, total_kimg=batch * 10 / 1000,
                     log_every_kimg=batch * 5 / 1000, checkpoint_every_kimg=batch * 4 / 1000, keep_checkpoints=2,
                     ema_halflife_kimg=0.01, ema_rampup_ratio=None, **spec_kw)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=spec.lr)
    return Engine(acc, spec, tmp_path, modules={"net": net}, optimizers={"sgd": opt},
                  updates=[Update("sgd", "net", loss)], batches=regression_batches(batch // accum), ema=("net",),
                  log=lambda m: None)


def weights(engine):
    return torch.cat([p.detach().flatten() for p in engine.modules["net"].parameters()])


def test_accumulation_matches_one_big_batch(tmp_path):
    """accum=2 with micro-batches of 4 gives the same update as one batch of 8 made of the same rows."""
    a = make_engine(tmp_path / "a", accum=2)
    a.run()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    big = regression_batches(4)

    def pairs(start):
        it = big(start * 2)
        while True:
            (x1, y1), (x2, y2) = next(it), next(it)
            yield torch.cat([x1, x2]), torch.cat([y1, y2])
    b = make_engine(tmp_path / "b", accum=1)
    b.batches = pairs
    b.run()
    assert a.step == b.step == 10
    torch.testing.assert_close(weights(a), weights(b), rtol=1e-6, atol=1e-7)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    calls, before = {"n": 0}, {}

    def nan_on_third_step(modules, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            before["w"] = weights(e).clone()  # the weights the NaN step must leave alone
            return mse(modules, batch) * math.nan
        return mse(modules, batch)
    e = make_engine(tmp_path, loss=nan_on_third_step)
    e.spec.total_kimg = 8 * 3 / 1000
    e.run()
    assert e.step == 3 and e.skipped == 1
    assert torch.equal(weights(e), before["w"])
    assert all(torch.isfinite(weights(e)))


def test_consecutive_nonfinite_steps_stop_training(tmp_path):
    e = make_engine(tmp_path, loss=lambda m, b: mse(m, b) * math.nan, max_nonfinite_steps=3)
    with pytest.raises(TrainingError, match="3 steps in a row"):
        e.run()


def test_lr_ramp_and_ema_halflife():
    spec = TrainSpec(lr=1.0, lr_rampup_kimg=10)
    assert lr_at(spec, 0) == 0 and lr_at(spec, 5000) == 0.5 and lr_at(spec, 20000) == 1.0
    # After one half-life of images, the old average keeps exactly half its weight.
    beta = ema_beta(batch_images=100, nimg=10**9, halflife_kimg=1.0, rampup_ratio=None)
    assert beta ** 10 == pytest.approx(0.5)
    # Early on the half-life is capped at rampup_ratio x images seen.
    assert ema_beta(100, 1000, 1.0, rampup_ratio=0.1) == pytest.approx(0.5)


def test_checkpoints_rotate_and_truncated_newest_falls_back(tmp_path, capsys):
    e = make_engine(tmp_path)
    e.run()  # checkpoints at steps 4, 8 and the final 10; keep 2
    ckpts = e.checkpointer.complete()
    assert [p.name for p in ckpts] == ["ckpt-000000010", "ckpt-000000008"]
    final_w = weights(e).clone()

    # Truncate the newest: a fresh engine resumes from step 8, and says why.
    model_file = next(ckpts[0].glob("model*.safetensors"))
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    logs = []
    f = make_engine(tmp_path)
    f.log = logs.append
    f.checkpointer.log = logs.append
    assert f.resume()
    assert f.step == 8
    assert any("truncated" in m and "ckpt-000000010" in m for m in logs)
    f.run()
    assert f.step == 10
    torch.testing.assert_close(weights(f), final_w, rtol=0, atol=0)  # the same last two steps again

    # Every checkpoint broken: a clear error, not a silent restart from scratch.
    for p in f.checkpointer.complete():
        (p / "checkpoint.json").write_text("{")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    g = make_engine(tmp_path)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        g.resume()


def test_batch_not_divisible_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match="not divisible"):
        make_engine(tmp_path, accum=3, batch=8)


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    e = make_engine(tmp_path, precision="bf16")
    first = mse(e.modules, next(regression_batches(8)(0))).item()
    e.run()
    assert all(p.dtype == torch.float32 for p in e.modules["net"].parameters())
    assert all(p.dtype == torch.float32 for p in e.ema["net"].parameters())
    assert mse(e.modules, next(regression_batches(8)(0))).item() < first
