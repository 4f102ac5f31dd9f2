"""Score Mismatching (trainer/score_mismatch.py) and the distill stage (stages/distill.py): gradient
isolation, the fake target's independence, R1's official relative weight and its double backward, Gaussian
toys, teacher shards made once, bit-identical resume, and the user errors. Small on purpose: a fake fused
stage of three untrained tiny auxiliaries."""
import json
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch import nn

from shards.errors import ModelError
from shards.prepare import data_fingerprint, write_manifest, write_shard
from tests.conftest import DIGITS, scorefuse_here
from stages.config import load_config
from trainer.edm import Denoiser
from trainer.engine import Engine, Update
from trainer.export import export_denoiser
from stages.rundir import RunDir, engine_paths, mark_finished
from trainer.score_mismatch import (OneStepGenerator, ScoreNet, check_shapes, d_noise, d_step_loss, g_step_loss,
                                    lazy_adam_scaling, r1_step_loss, smm_sigmas)
from trainer.spec import TrainSpec
from trainer.unet import build_unet

SHAPE = (1, 16, 16)
AUX = ["aux-low", "aux-high", "aux-even"]


# ---- the losses as docs/METHODS.md §2 writes them, each on its own (the oracles of the batched stage code) ----

def _sigma(D, t, ndim):
    return D.sigmas[t].reshape(-1, *([1] * (ndim - 1)))


def real_loss(D, x0, t, eps):
    return (D(x0 + _sigma(D, t, x0.dim()) * eps, t) - eps).square().mean()


def fake_loss(D, x_fake, t, eps, eps_target):
    return (D(x_fake + _sigma(D, t, x_fake.dim()) * eps, t) - eps_target).square().mean()


def generator_loss(D, x_fake, t, eps):
    return (D(x_fake + _sigma(D, t, x_fake.dim()) * eps, t) - eps).square().mean()


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    G = OneStepGenerator(Denoiser(build_unet("tiny", 16, 1), 0.5), 80.0)
    D = ScoreNet(Denoiser(build_unet("tiny", 16, 1), 0.5))
    return G, D


def test_smm_levels_match_methods():
    expected = [0.010, 0.049, 0.083, 0.117, 0.150, 0.183, 0.215, 0.247, 0.279, 0.310]
    assert np.allclose(smm_sigmas().numpy(), expected, atol=1.5e-3)


def test_each_update_trains_only_its_network(tmp_path):
    """Through the engine, as the stage runs them: D's and R1's steps leave G alone, G's step leaves D alone
    (D frozen while G's graph is built), and each network's parameters change only in its own steps."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    G, D = tiny_pair()
    frozen_seen = {"G in D step": [], "D in G step": []}

    def loss_d(m, real, step):
        frozen_seen["G in D step"].append(any(p.requires_grad for p in m["G"].parameters()))
        return d_step_loss(m["D"], m["G"], real)

    def loss_r1(m, real, step):
        return r1_step_loss(m["D"], real, gamma=0.01, global_batch=4)

    def loss_g(m, _, step):
        frozen_seen["D in G step"].append(any(p.requires_grad for p in m["D"].parameters()))
        return g_step_loss(m["D"], m["G"], 4, SHAPE, "cpu")

    def real_images(start):
        g = torch.Generator().manual_seed(start)
        while True:
            yield torch.rand(4, *SHAPE, generator=g) * 2 - 1
    spec = TrainSpec(batch=4, lr=1e-2, lr_rampup_kimg=0, total_kimg=0.012, checkpoint_every_kimg=0)
    engine = Engine(Accelerator(cpu=True), spec, engine_paths(tmp_path), modules={"G": G, "D": D},
                    optimizers={"g": torch.optim.Adam(G.parameters(), lr=1e-2), "d": torch.optim.Adam(D.parameters(), lr=1e-2)},
                    updates=[Update("d", "D", loss_d), Update("d", "D", loss_r1, every=2), Update("g", "G", loss_g, takes_batch=False)],
                    batches=real_images, log=lambda m: None)
    before = {k: v.clone() for k, v in {**G.state_dict(), **{f"D.{k}": v for k, v in D.state_dict().items()}}.items()}
    engine.run()
    assert frozen_seen == {"G in D step": [False] * 3, "D in G step": [False] * 3}
    assert all(p.requires_grad for p in [*G.parameters(), *D.parameters()])
    after = {**G.state_dict(), **{f"D.{k}": v for k, v in D.state_dict().items()}}
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("D."))
    assert any(not torch.equal(before[k], after[k]) for k in after if not k.startswith("D."))


def test_fake_target_is_fresh_noise():
    G, D = tiny_pair()
    torch.manual_seed(1)
    real = torch.rand(16, *SHAPE) * 2 - 1
    draws = d_noise(real, 10)
    corr = np.corrcoef(draws[3].flatten().numpy(), draws[4].flatten().numpy())[0, 1]
    assert abs(corr) < 0.05, corr  # 4096 pairs: the standard error is about 0.016
    # the batched D step computes exactly L_real + L_fake of the separate formulas
    with torch.no_grad():
        fake = G(torch.zeros_like(real))  # the same fake as inside: G's input does not matter here...

    def fixed(real_, levels):
        return draws
    g_const = lambda z: fake  # ...so that G is a constant in this check
    t_real, t_fake, eps_real, eps_fake, eps_target = draws
    with torch.no_grad():
        expected = real_loss(D, real, t_real, eps_real) + fake_loss(D, fake, t_fake, eps_fake, eps_target)
        got = d_step_loss(D, g_const, real, noise=fixed)
    assert torch.allclose(got, expected, rtol=1e-5), (got, expected)
    replaced = lambda real_, levels: (t_real, t_fake, eps_real, eps_fake, eps_fake)
    with torch.no_grad():
        plain = real_loss(D, real, t_real, eps_real) + real_loss(D, fake, t_fake, eps_fake)
        assert torch.allclose(d_step_loss(D, g_const, real, noise=replaced), plain, rtol=1e-5)


class LinearScore(nn.Module):
    """eps(x, t) = a * x: the input gradient of sum eps is a everywhere, so R1 is known exactly."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.register_buffer("sigmas", smm_sigmas())

    def forward(self, x, t):
        return self.a * x


def test_r1_has_the_official_weight_relative_to_the_data_terms():
    """Official (docs/METHODS.md §2): L_real summed over batch and pixels; R1 = (gamma/2) x mean over the batch of
    the per-image pixel sum of g^2, not multiplied by the lazy interval (its Dreg branch leaves out StyleGAN2's
    gain). Ours divides every term by B*P; the ratio must be the official one."""
    B, gamma, a = 8, 0.01, 0.7
    D = LinearScore(a)
    real = torch.rand(B, *SHAPE) * 2 - 1
    P = real[0].numel()
    torch.manual_seed(0)
    ours_r1 = r1_step_loss(D, real, gamma, global_batch=B)
    t, eps = torch.randint(10, (B,)), torch.randn_like(real)
    ours_real = real_loss(D, real, t, eps)
    official_r1 = gamma / 2 * (a ** 2 * P)                   # the mean over images of the sum over pixels of a^2
    official_real = ours_real * B * P                        # the same squared errors, summed
    assert float(ours_r1.detach() / ours_real.detach()) == pytest.approx(official_r1 / float(official_real.detach()), rel=1e-5)
    assert float(ours_r1.detach()) == pytest.approx(official_r1 / (B * P), rel=1e-5)
    assert lazy_adam_scaling(16) == pytest.approx(16 / 17) and lazy_adam_scaling(0) == 1.0


def test_r1_double_backward_runs_on_the_math_attention_kernel():
    """The UNet's attention inputs are contiguous, so a fused kernel runs by default, and it has no double
    backward; R1 selects the math kernel, so its gradient penalty trains D."""
    _, D = tiny_pair()
    for p in D.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)  # no zero-initialised layer that would cut the graph
    real = torch.rand(4, *SHAPE) * 2 - 1
    x = real.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(D(x, torch.zeros(4, dtype=torch.long)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for .*attention.* is not implemented"):
        g.square().sum().backward()  # the default kernel: what R1 would hit without the math kernel
    D.zero_grad()
    r1_step_loss(D, real, gamma=0.01, global_batch=4).backward()
    attention = D.denoiser.net.encoder[-1].attention.qkv.weight.grad
    assert attention is not None and attention.abs().sum() > 0


def test_r1_input_gradient_is_unscaled_after_the_loss_scale():
    _, D = tiny_pair()
    real = torch.rand(4, *SHAPE) * 2 - 1
    torch.manual_seed(3)
    plain = r1_step_loss(D, real, 0.01, 4)
    torch.manual_seed(3)
    scaled = r1_step_loss(D, real, 0.01, 4, grad_scale=2.0 ** 16)
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=0)


# ---- Gaussian toys ---------------------------------------------------------------------------------

class ToyScore(nn.Module):
    def __init__(self, dim, hidden=64):
        super().__init__()
        self.register_buffer("sigmas", smm_sigmas())
        self.emb = nn.Embedding(10, 16)
        self.net = nn.Sequential(nn.Linear(dim + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, self.emb(t)], 1))


def toy(mismatch, dim=1, steps=800, d_steps=4, mean=0.5, std=0.25, lr_g=1e-3, lr_d=5e-3, batch=128, seed=0):
    """SMM on data N(mean, std^2 I) with tiny MLPs, d_steps D steps per G step (the analysis assumes a
    near-optimal D). Returns the generator's sample mean at the start and the end, and its sample std
    averaged over the second half of training (one step's std oscillates: the game is noisy in 1-D)."""
    torch.manual_seed(seed)
    G = nn.Sequential(nn.Linear(dim, 32), nn.SiLU(), nn.Linear(32, dim))
    D = ToyScore(dim)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_g, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr_d, betas=(0.0, 0.99))
    probe = torch.randn(2048, dim)
    with torch.no_grad():
        start_mean = G(probe).mean(0)
    stds = []
    for step in range(steps):
        for _ in range(d_steps):
            x0 = mean + std * torch.randn(batch, dim)
            with torch.no_grad():
                fake = G(torch.randn(batch, dim))
            loss = real_loss(D, x0, torch.randint(10, (batch,)), torch.randn_like(x0))
            if mismatch:
                loss = loss + fake_loss(D, fake, torch.randint(10, (batch,)), torch.randn_like(fake),
                                        torch.randn_like(fake))
            opt_d.zero_grad()
            loss.backward()
            opt_d.step()
        fake = G(torch.randn(batch, dim))
        opt_g.zero_grad()
        D.requires_grad_(False)  # as the engine freezes the other networks during an update
        generator_loss(D, fake, torch.randint(10, (batch,)), torch.randn_like(fake)).backward()
        D.requires_grad_(True)
        opt_g.step()
        if step >= steps // 2 and step % 20 == 0:
            with torch.no_grad():
                stds.append(G(probe).std(0))
    with torch.no_grad():
        end_mean = G(probe).mean(0)
    return start_mean, end_mean, torch.stack(stds).mean(0)


def test_toy_2d_generator_mean_moves_to_the_data_mean():
    mean = torch.tensor([0.5, -0.4])
    start, end, _ = toy(True, dim=2, steps=300, d_steps=1, mean=mean)
    assert (end - mean).norm() < 0.35 * (start - mean).norm(), (start, end)


def test_toy_1d_variance_collapses_without_the_mismatch_term_and_not_with_it():
    """docs/METHODS.md §2: real-only training collapses a 1-D generator; with the mismatch term SMM has no
    exact fixed point at the data (about 0.7 of the data's std). Measured here (seeds 0 and 1, std averaged
    over the second half): std ratio 0.05 / 0.04 without (400 steps), 0.44 / 0.41 with (800 steps, 4 D steps
    per G step; the 1-D game oscillates, and the 0.7 of docs/METHODS.md needs a near-optimal D and longer
    runs). Tolerance band, not equality."""
    data_std = 0.25
    _, _, collapsed = toy(False, d_steps=1, steps=400)
    _, _, kept = toy(True)
    assert collapsed.item() / data_std < 0.1, collapsed
    assert 0.2 < kept.item() / data_std < 1.3, kept
    assert kept > 4 * collapsed


# ---- the stage on a fake fused run ---------------------------------------------------------------

STAGE = ["distill.teacher_samples=24", "distill.teacher_steps=2", "distill.batch=8", "distill.r1_every=2",
         "distill.ema_halflife_kimg=0.02", "distill.eval_every_kimg=0", "distill.snapshot_every_kimg=0",
         "distill.checkpoint_every_kimg=0.016", "distill.real_mix=0.25", "train.log_every_kimg=0.016",
         "eval.grid_images=4"]


def fake_run(root):
    """A digits run directory with tiny random data, three untrained auxiliaries and a lambda.json: all a
    distill run needs, without training anything."""
    cfg = load_config(DIGITS, [f"root={root}"])
    run = RunDir.of(cfg).root
    rng = np.random.default_rng(0)
    populations = {}
    for name, count in [("target", 16), ("reference", 16)]:
        (run / "data" / name).mkdir(parents=True)
        images = rng.integers(0, 256, (count, 16, 16, 1), dtype=np.uint8)
        entry = write_shard(run / "data" / name / "shard-000000.tar",
                            ((f"{name}-{i:07d}", im, i % 10) for i, im in enumerate(images)))
        populations[name] = {"role": name, "split": "train", "count": count, "mixture": {}, "class_histogram": {},
                             "shards": [dict(entry, file=f"{name}/{entry['file']}")], "hash": name}
    write_manifest(run / "data", {"version": 1, "fingerprint": data_fingerprint(cfg.data), "image_size": 16,
                                  "channels": 1, "class_names": [str(i) for i in range(10)], "disjoint": True,
                                  "overlaps": [], "populations": populations})
    for i, name in enumerate(AUX):
        torch.manual_seed(i)
        net = build_unet("tiny", 16, 1)
        with torch.no_grad():  # not the zero output of a fresh UNet, so the models differ
            net.output_conv.weight.normal_(0, 0.02)
        export_denoiser(run / "aux" / name, Denoiser(net, 0.5),
                        {"preset": "tiny", "dropout": None, "image_size": 16, "channels": 1, "sigma_data": 0.5,
                         "population": name})
        mark_finished(run / "aux" / name, {"kimg": 0, "steps": 0, "skipped_steps": 0, "seconds": 0})
    lam = [0.5, 0.3, 0.2]
    RunDir.of(cfg).lambda_file.parent.mkdir()
    RunDir.of(cfg).lambda_file.write_text(json.dumps(
        {"method": "exact", "names": AUX, "sigma_edges": None, "target": "target", "target_images": 16,
         "exact": {"lambda": [lam], "vertex_losses": {"aux-low": 0.3, "aux-high": 0.2, "aux-even": 0.4}, "seconds": 0},
         "sgd": {"lambda": [lam], "seconds": 0}}))
    mark_finished(RunDir.of(cfg).fuse, {"seconds": 0})
    return run


def run_distill(root, capfd, *overrides):
    from stages.distill import run
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    run(load_config(DIGITS, [f"root={root}", *STAGE, *overrides]))
    return capfd.readouterr().err.splitlines()


def checkpoint_tensors(stage):
    ckpt = sorted((stage / "checkpoints").glob("ckpt-*"))[-1]
    out = {"ckpt": ckpt.name}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(f).items()})
    for f in sorted(ckpt.glob("optimizer*.bin")):
        state = torch.load(f, weights_only=True)["state"]
        out.update({f"{f.name}/{k}/{n}": v for k, s in state.items() for n, v in s.items()})
    return out


def test_teacher_shards_once_and_resume_bit_identical(tmp_path, capfd):
    straight = fake_run(tmp_path / "a")
    shutil.copytree(straight, tmp_path / "b" / "digits")
    resumed = tmp_path / "b" / "digits"
    total = "distill.total_kimg=0.048"  # 6 steps of 8 images
    run_distill(tmp_path / "a", capfd, total)
    stage = resumed / "distill"
    logs = run_distill(tmp_path / "b", capfd, "distill.total_kimg=0.024")  # 3 steps, then "interrupted"
    manifest = json.loads((stage / "teacher" / "manifest.json").read_text())
    assert manifest["populations"]["teacher"]["count"] == 24
    shard = stage / "teacher" / "shard-000000.tar"
    mtime = shard.stat().st_mtime_ns
    for name in ("done.json", "generator.json", "generator.safetensors"):
        (stage / name).unlink()
    logs = run_distill(tmp_path / "b", capfd, total)
    assert shard.stat().st_mtime_ns == mtime
    assert any("reusing 24" in line for line in logs), logs
    assert any("resumed from" in line for line in logs), logs
    a, b = checkpoint_tensors(straight / "distill"), checkpoint_tensors(stage)
    assert a["ckpt"] == b["ckpt"] == "ckpt-000000006"
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        if key != "ckpt":
            assert torch.equal(a[key], b[key]), key
    ga, gb = load_file(straight / "distill" / "generator.safetensors"), load_file(stage / "generator.safetensors")
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    meta = json.loads((stage / "generator.json").read_text())
    assert meta["init"] == "warm" and meta["sigma_max"] == 1.0 and meta["teacher"]["warm"] == "aux/aux-high"
    # loadable without training state, and `sample` writes uint8 NHWC
    from stages.sample import run as sample
    path = sample(load_config(DIGITS, [f"root={tmp_path / 'b'}"]), "distill", 5, str(tmp_path / "s.npz"))
    images = np.load(path)["images"]
    assert images.shape == (5, 16, 16, 1) and images.dtype == np.uint8


def test_distill_before_fuse_is_a_clear_error(tmp_path, capfd):
    run = fake_run(tmp_path)
    shutil.rmtree(run / "fuse")
    code, _, err = scorefuse_here(capfd, "distill", "--config", DIGITS, f"root={tmp_path}")
    assert code == 2, err
    assert "run `scorefuse fuse` first" in err


def test_shape_mismatch_is_a_clear_error():
    G, D = tiny_pair()
    with pytest.raises(ModelError, match="generator makes images of shape"):
        check_shapes(lambda z: G(z)[:, :, :8], D, SHAPE)
    with pytest.raises(ModelError, match="score network"):
        check_shapes(G, lambda x, t: x[:, :, :8], SHAPE)
    with pytest.raises(ModelError, match="cannot take"):
        check_shapes(G, D, (1, 10, 10))  # the tiny UNet needs a multiple of 4


def test_the_generator_holds_its_sigma_on_its_device_and_saves_the_same_weights():
    """G's noise level is a buffer that moves with G (a Python float would be a blocking host-to-GPU copy at
    every call) and is not saved: the exported weights are the denoiser's alone."""
    G, _ = tiny_pair()
    assert G.sigma.device == next(G.parameters()).device and G.sigma.dtype == torch.float32
    assert set(G.state_dict()) == {f"denoiser.{k}" for k in G.denoiser.state_dict()}
    z = torch.randn(2, 1, 16, 16)
    assert torch.equal(G(z), G.denoiser(z * 80.0, 80.0))
    assert G.to("meta").sigma.device.type == "meta"
