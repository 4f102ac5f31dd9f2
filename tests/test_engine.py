"""The engine on a toy problem where every number is known: accumulation, skipped steps, EMA, LR,
checkpoint rotation and the fall-back from a truncated checkpoint."""
import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from shards.errors import CheckpointError
from trainer.ema import ema_beta, update_ema
from shards.errors import ModelError
from stages.rundir import engine_paths
from trainer.engine import Engine, Update, lr_at
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


def mse(modules, batch, step=0):
    x, y = batch
    return ((modules["net"](x) - y) ** 2).mean()


def make_engine(tmp_path, accum=1, batch=8, loss=mse, fused=False, **spec_kw):
    spec = TrainSpec(batch=batch, accum=accum, lr=0.05, lr_rampup_kimg=0, total_kimg=batch * 10 / 1000,
                     log_every_kimg=batch * 5 / 1000, checkpoint_every_kimg=batch * 4 / 1000, keep_checkpoints=2,
                     ema_halflife_kimg=0.01, ema_rampup_ratio=None, **spec_kw)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=spec.lr, fused=fused)
    return Engine(acc, spec, engine_paths(tmp_path), modules={"net": net}, optimizers={"sgd": opt},
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


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, fused):
    """A fused optimizer skips the step on the device (found_inf); any other one after a host read."""
    calls, before = {"n": 0}, {}

    def nan_on_third_step(modules, batch, step):
        calls["n"] += 1
        if calls["n"] == 3:
            before["w"] = weights(e).clone()  # the weights the NaN step must leave alone
            return mse(modules, batch) * math.nan
        return mse(modules, batch)
    e = make_engine(tmp_path, loss=nan_on_third_step, fused=fused)
    e.spec.total_kimg = 8 * 3 / 1000
    e.run()
    assert e.step == 3 and e.skipped == 1
    assert torch.equal(weights(e), before["w"])
    assert all(torch.isfinite(weights(e)))


def test_consecutive_nonfinite_steps_stop_training(tmp_path):
    """Counted on the device and checked at the next log or checkpoint boundary (no host sync per step):
    here the checkpoint after step 4 stops a run that went bad at step 1."""
    e = make_engine(tmp_path, loss=lambda m, b, s: mse(m, b) * math.nan, max_nonfinite_steps=3)
    with pytest.raises(ModelError, match="4 steps in a row had non-finite gradients"):
        e.run()
    assert e.step == 4


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
    with pytest.raises(ModelError, match="not divisible"):
        make_engine(tmp_path, accum=3, batch=8)


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    e = make_engine(tmp_path, precision="bf16")
    first = mse(e.modules, next(regression_batches(8)(0))).item()
    e.run()
    assert all(p.dtype == torch.float32 for p in e.modules["net"].parameters())
    assert all(p.dtype == torch.float32 for p in e.ema["net"].parameters())
    assert mse(e.modules, next(regression_batches(8)(0))).item() < first


class MetaAccelerator(Accelerator):
    """prepare() moves modules to another device, as Accelerate moves them to the GPU."""

    def prepare(self, *objects):
        return tuple(o.to("meta") if isinstance(o, nn.Module) else o for o in objects)


def test_ema_lives_where_the_prepared_module_does(tmp_path):
    spec = TrainSpec(batch=8, lr_rampup_kimg=0, total_kimg=0.08)
    net = nn.Linear(4, 1)
    engine = Engine(MetaAccelerator(cpu=True), spec, engine_paths(tmp_path), modules={"net": net},
                    optimizers={"sgd": torch.optim.SGD(net.parameters(), lr=0.1)},
                    updates=[Update("sgd", "net", mse)], batches=regression_batches(8), ema=("net",), log=lambda m: None)
    assert {p.device.type for p in engine.ema["net"].parameters()} == {"meta"}
    update_ema(engine.ema["net"], engine.unwrap("net"), 0.5)  # the per-step update mixes no devices


def test_an_update_trains_only_its_module_and_the_stream_counts_what_was_taken(tmp_path):
    """Two modules: the update of `a` runs `b` too, which gets no gradient and keeps requires_grad; an update
    that takes no batch takes nothing from the stream; an `every`-2 update runs at even steps only."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 4)
    seen = {"a": [], "b": [], "b_grads_during_a": [], "lazy": []}

    def loss_a(modules, batch, step):
        x, y = batch
        seen["a"].append(step)
        seen["b_grads_during_a"].append(any(p.requires_grad for p in modules["b"].parameters()))
        return ((modules["a"](modules["b"](x)) - y) ** 2).mean()

    def loss_b(modules, batch, step):
        assert batch is None
        seen["b"].append(step)
        return modules["b"](torch.ones(2, 4)).square().mean()

    def loss_lazy(modules, batch, step):
        seen["lazy"].append(step)
        return modules["a"](batch[0]).square().mean()

    spec = TrainSpec(batch=8, lr=0.01, lr_rampup_kimg=0, total_kimg=0.04, log_every_kimg=0.008,
                     checkpoint_every_kimg=0.016)
    engine = Engine(Accelerator(cpu=True), spec, engine_paths(tmp_path), modules={"a": a, "b": b},
                    optimizers={"sa": torch.optim.SGD(a.parameters(), lr=0.01), "sb": torch.optim.SGD(b.parameters(), lr=0.01)},
                    updates=[Update("sa", "a", loss_a), Update("sb", "b", loss_b, takes_batch=False),
                             Update("sa", "a", loss_lazy, every=2, name="lazy")],
                    batches=regression_batches(8), log=lambda m: None)
    b_before = [p.detach().clone() for p in b.parameters()]
    engine.run()
    assert seen["a"] == seen["b"] == [0, 1, 2, 3, 4] and seen["lazy"] == [0, 2, 4]
    assert not any(seen["b_grads_during_a"])
    assert all(p.requires_grad for p in b.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(b.parameters(), b_before))  # b trained in its own update
    assert engine.stream_position() == 5 + 3  # the batch-taking updates ran 5 and 3 times
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_a", "loss_b", "loss_lazy"} <= rows[-1].keys()
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_a"] + rows[-1]["loss_b"] + rows[-1]["loss_lazy"])


def _rewrite_index(ckpt):
    """Recompute checkpoint.json after a file was replaced: the forgery passes the size and hash check."""
    from shards.atomic import sha256_file
    index = json.loads((ckpt / "checkpoint.json").read_text())
    for rel in index["files"]:
        p = ckpt / rel
        index["files"][rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    (ckpt / "checkpoint.json").write_text(json.dumps(index))


def _forge_optimizer_pickle(path):
    """A pickle that would run code when unpickled without weights_only."""
    import os as _os
    import pickle

    class Exploit:
        def __reduce__(self):
            return (_os.system, ("echo pwned",))
    path.write_bytes(pickle.dumps({"state": Exploit(), "param_groups": []}, protocol=2))


FORGERIES = {
    "model.safetensors": lambda p: __import__("safetensors.torch", fromlist=["save_file"]).save_file(
        {"weight": torch.zeros(2, 2)}, p),                                       # other tensors
    "ema-net.safetensors": lambda p: __import__("safetensors.torch", fromlist=["save_file"]).save_file(
        {"weight": torch.zeros(1, 5), "bias": torch.zeros(1)}, p),             # other shapes
    "optimizer.bin": _forge_optimizer_pickle,                                    # a code-running pickle
    "random_states_0.pkl": lambda p: torch.save({"random_state": "forged"}, p),  # not a random state
    "state.json": lambda p: p.write_text(json.dumps({"step": 8})),               # stream position missing
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_forged_file_makes_its_checkpoint_unusable_and_the_previous_one_is_used(tmp_path, name):
    e = make_engine(tmp_path)
    e.run()  # checkpoints 8 and 10 kept
    newest = e.checkpointer.complete()[0]
    FORGERIES[name](newest / name)
    _rewrite_index(newest)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    logs = []
    f = make_engine(tmp_path)
    f.log = f.checkpointer.log = logs.append
    assert f.resume() and f.step == 8, logs
    warning = [m for m in logs if m.startswith("warning:")]
    assert len(warning) == 1 and name in warning[0] and "ckpt-000000010" in warning[0], logs


def test_resume_option_latest_none_or_a_path(tmp_path):
    e = make_engine(tmp_path)
    e.run()
    older = e.checkpointer.complete()[1]
    for resume, step in (("none", 0), (str(older), 8), ("latest", 10)):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        f = make_engine(tmp_path, resume=resume)
        f.resume()
        assert f.step == step, resume
    FORGERIES["optimizer.bin"](older / "optimizer.bin")
    _rewrite_index(older)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(CheckpointError, match="train.resume: checkpoint .*optimizer.bin cannot be loaded"):
        make_engine(tmp_path, resume=str(older)).resume()


def test_a_launcher_precision_other_than_train_precision_is_named(monkeypatch, capsys):
    from trainer.accelerator import make_accelerator
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    make_accelerator(TrainSpec(precision="no"))
    err = capsys.readouterr().err
    assert "--mixed_precision bf16 is not used: train.precision=no decides" in err


def test_runs_on_one_accelerator_share_neither_models_nor_accumulation(tmp_path):
    """The fuse stage trains several models one after another on one Accelerator (the SGD fit, the router,
    the baselines). A later run steps at its own train.accum, not the Accelerator's, and its checkpoints
    hold its own model alone, so a fresh process that builds only that run resumes from them."""
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    spec = TrainSpec(batch=8, accum=2, lr=0.05, lr_rampup_kimg=0, total_kimg=0.08, checkpoint_every_kimg=0.04,
                     log_every_kimg=0.04)
    first = nn.Linear(4, 1)
    Engine(acc, spec, engine_paths(tmp_path / "first"), modules={"net": first},
           optimizers={"sgd": torch.optim.SGD(first.parameters(), lr=0.05)}, updates=[Update("sgd", "net", mse)],
           batches=regression_batches(4), log=lambda m: None).run()

    def later_run(accelerator):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
        return Engine(accelerator, replace(spec, accum=1), engine_paths(tmp_path / "later"), modules={"net": net},
                      optimizers={"adam": optimizer}, updates=[Update("adam", "net", mse)],
                      batches=regression_batches(8), log=lambda m: None), optimizer
    later, optimizer = later_run(acc)
    later.run()
    assert all(state["step"] == 10 for state in optimizer.state.values())  # one step per iteration, not 5
    checkpoint = later.checkpointer.complete()[0]
    assert sorted(p.name for p in checkpoint.glob("model*.safetensors")) == ["model.safetensors"]

    AcceleratorState._reset_state(True)  # a fresh process
    GradientState._reset_state()
    fresh, _ = later_run(Accelerator(cpu=True, gradient_accumulation_steps=2))
    assert fresh.resume() and fresh.step == 10


def test_the_ema_evaluates_in_float32_under_mixed_precision_training(tmp_path):
    """Accelerate gives the prepared module an autocast forward; the EMA (what the periodic Fréchet distance
    and evaluate sample) must not inherit it, or one model would be measured at two precisions."""
    net = nn.Linear(4, 1)
    e = Engine(Accelerator(cpu=True, mixed_precision="bf16"), TrainSpec(batch=8, precision="bf16"), engine_paths(tmp_path),
               modules={"net": net}, optimizers={"sgd": torch.optim.SGD(net.parameters(), lr=0.1)},
               updates=[Update("sgd", "net", mse)], batches=regression_batches(8), ema=("net",), log=lambda m: None)
    assert "forward" in e.unwrap("net").__dict__  # the premise: Accelerate's patched forward
    x = torch.randn(16, 4)
    ema = e.ema["net"]
    assert torch.equal(ema(x), nn.functional.linear(x, ema.weight, ema.bias))


def test_compile_wraps_the_prepared_module_and_spares_a_double_backward(tmp_path):
    """train.compile compiles the module as prepared (around DDP, so the all-reduce overlaps the backward),
    unwrap still reaches the module itself, and a module trained through a double backward (R1) stays
    uncompiled, since torch.compile cannot differentiate twice."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    spec = TrainSpec(batch=8, lr_rampup_kimg=0, total_kimg=0.08, compile=True)
    messages = []
    engine = Engine(Accelerator(cpu=True), spec, engine_paths(tmp_path), modules={"a": a, "b": b},
                    optimizers={"sa": torch.optim.SGD(a.parameters(), lr=0.1),
                                "sb": torch.optim.SGD(b.parameters(), lr=0.1)},
                    updates=[Update("sa", "a", mse), Update("sb", "b", mse, double_backward=True)],
                    batches=regression_batches(8), log=messages.append)
    assert isinstance(engine.modules["a"], torch._dynamo.eval_frame.OptimizedModule)
    assert engine.modules["b"] is b
    assert engine.unwrap("a") is a and engine.unwrap("b") is b
    assert engine.modules["a"]._orig_mod is a  # unwrapping left the compiled module as it was
    assert any("b not compiled" in m for m in messages)


@pytest.mark.parametrize("benchmark", [True, False])
def test_cudnn_autotuning_follows_the_config(benchmark):
    from trainer.accelerator import make_accelerator
    before = torch.backends.cudnn.benchmark
    try:
        make_accelerator(TrainSpec(cudnn_benchmark=benchmark))
        assert torch.backends.cudnn.benchmark is benchmark
    finally:
        torch.backends.cudnn.benchmark = before
