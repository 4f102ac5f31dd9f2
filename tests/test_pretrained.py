"""Pretrained auxiliaries: diffusers' DDPM models as EDM denoisers (trainer/pretrained.py), loaded, recorded and
refused (stages/pretrained.py), and fused with auxiliaries trained here through the CLI.

The models are tiny UNet2DModels that the tests build and save with save_pretrained; diffusers' own schedulers
are the reference for the wrapper, and a network that is exact for Gaussian data for the denoiser itself.
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, EulerDiscreteScheduler, UNet2DModel
from omegaconf import OmegaConf

from evaluation.likelihood import log_likelihood
from shards.errors import CheckpointError, ConfigError, ModelError
from shards.populations import ordered_populations
from shards.prepare import data_fingerprint
from shards.spec import AuxSpec
from stages.config import load_config
from stages.pretrained import load_pretrained, load_recorded, save_record, weights_sha256
from tests.conftest import DIGITS, ROOT, scorefuse, scorefuse_here
from trainer.fused_denoiser import FusedDenoiser, architecture_difference
from trainer.gaussian import GaussianDenoiser
from trainer.lambda_fit import objective_of
from trainer.pretrained import DiscreteTimeDenoiser, from_diffusers

SHAPE = (1, 8, 8)  # the digits'


def tiny_unet(seed: int = 0, size: int = SHAPE[-1], channels: int = 1, cls=UNet2DModel) -> UNet2DModel:
    torch.manual_seed(seed)
    return cls(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
               layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def scheduler_config(**changes) -> dict:
    return dict(DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **changes).config)


# ---- the wrapper ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_the_wrapper_is_ddpms_own_prediction_of_x0_on_its_table(prediction, schedule):
    unet = tiny_unet()
    scheduler = DDPMScheduler(beta_schedule=schedule, prediction_type=prediction, clip_sample=False)
    denoiser = from_diffusers(unet, dict(scheduler.config))
    abar = scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(1)
    for t in (0, 1, 37, 500, 998, 999):
        sigma = float(((1 - abar[t]) / abar[t]).sqrt())
        x = torch.randn(2, *SHAPE, generator=generator) * (1 + sigma)
        with torch.no_grad():
            x_t = x / (sigma ** 2 + 1) ** 0.5  # DDPM's sample at t is EDM's x scaled by c_in
            theirs = scheduler.step(unet(x_t, t).sample, t, x_t, generator=generator).pred_original_sample
            ours = denoiser(x, sigma)
        assert float(denoiser.timestep(torch.tensor([sigma], dtype=torch.float64))) == pytest.approx(t, abs=1e-9)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5 * (1 + sigma))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_timesteps_and_x0_follow_eulers_karras_schedule(prediction):
    """EulerDiscreteScheduler with Karras sigmas takes its timesteps by ln-sigma interpolation of the table (its
    _sigma_to_t): the wrapper's t(sigma) and x0 are its own, step by step along its sampling loop."""
    unet = tiny_unet()
    scheduler = EulerDiscreteScheduler(prediction_type=prediction, use_karras_sigmas=True)
    scheduler.set_timesteps(12)
    denoiser = from_diffusers(unet, dict(scheduler.config))
    sigmas = scheduler.sigmas[:-1].double()
    torch.testing.assert_close(denoiser.timestep(sigmas), scheduler.timesteps.double(), rtol=0, atol=1e-4)
    assert sum(float(t) != round(float(t)) for t in scheduler.timesteps) > 6  # between the table's entries
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
    for t, sigma in zip(scheduler.timesteps, sigmas):
        with torch.no_grad():
            output = unet(scheduler.scale_model_input(x, t), t).sample
            step = scheduler.step(output, t, x)
            ours = denoiser(x, float(sigma))
        torch.testing.assert_close(ours, step.pred_original_sample, rtol=1e-4, atol=2e-5 * (1 + float(sigma)))
        x = step.prev_sample


def test_rounded_timesteps_take_the_nearest_entry_in_ln_sigma():
    denoiser = from_diffusers(tiny_unet(), scheduler_config(), timesteps="round")
    table = denoiser.log_sigmas.exp()
    between = (table[10] * table[11]).sqrt()  # the geometric midpoint, then a little to either side
    assert denoiser.timestep(torch.stack([between * 0.999, between * 1.001, table[500]])).tolist() == [10, 11, 500]
    low, high = denoiser.sigma_range
    assert (low, high) == pytest.approx((float(table[0]), float(table[-1])))
    assert denoiser.timestep(torch.tensor([low / 10, high * 10])).tolist() == [0, 999]  # the table's ends


def test_pretrained_models_fuse_batched_as_in_the_loop_and_only_with_one_table():
    same = [from_diffusers(tiny_unet(seed), scheduler_config()) for seed in (0, 1)]
    fused = [FusedDenoiser(same, torch.tensor([0.3, 0.7]), batched=batched) for batched in (True, False)]
    assert fused[0].sigma_range == pytest.approx(same[0].sigma_range)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(9))
    sigma = torch.tensor([0.02, 1.5, 90.0])
    with torch.no_grad():
        difference = (fused[0](x, sigma) - fused[1](x, sigma)).abs().amax(dim=(1, 2, 3))
    # eps' float32 rounding, which the batched and the looped convolutions accumulate in different orders (3.5e-6
    # on an AMD EPYC), times sigma
    assert (difference < 1e-5 * (1 + sigma)).all(), difference
    other = from_diffusers(tiny_unet(1), scheduler_config(beta_schedule="squaredcos_cap_v2"))
    assert "log_sigma_table" in architecture_difference([same[0], other])
    with pytest.raises(ModelError, match="batched evaluation needs auxiliaries of one architecture"):
        FusedDenoiser([same[0], other], torch.tensor([0.5, 0.5]), batched=True)
    low, high = FusedDenoiser([same[0], other], torch.tensor([0.5, 0.5])).sigma_range
    assert (low, high) == (max(same[0].sigma_range[0], other.sigma_range[0]),
                           min(same[0].sigma_range[1], other.sigma_range[1]))


class GaussianEpsilon(UNet2DModel):
    """The exact eps (or v) of data N(mu, s^2 I) in DDPM's parametrisation at every timestep of the table and
    between (sigma(t) interpolated in ln sigma, as the wrapper inverts it): E[eps | x_t] =
    b (x_t - a mu) / (a^2 s^2 + b^2) with a = sqrt(abar), b = sqrt(1 - abar), and v = a eps - b x0."""

    def setup(self, mu: torch.Tensor, std: float, log_sigmas: torch.Tensor, prediction: str):
        self.mu, self.std, self.table, self.prediction = mu.double(), std, log_sigmas, prediction
        return self

    def forward(self, sample, timestep, return_dict=True):
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1, 1, 1, 1)
        low = t.floor().clamp(max=len(self.table) - 2).long()
        sigma = ((1 - (t - low)) * self.table[low] + (t - low) * self.table[low + 1]).exp()
        a, b = 1 / (1 + sigma ** 2).sqrt(), sigma / (1 + sigma ** 2).sqrt()
        x_t = sample.double()
        eps = b * (x_t - a * self.mu) / (a ** 2 * self.std ** 2 + b ** 2)
        x0 = self.mu + a * self.std ** 2 * (x_t - a * self.mu) / (a ** 2 * self.std ** 2 + b ** 2)
        out = (eps if self.prediction == "epsilon" else a * eps - b * x0).float()
        return (out,) if not return_dict else type("Output", (), {"sample": out})()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_an_exact_network_of_gaussian_data_gives_the_exact_denoiser_and_likelihood(prediction):
    mu = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3)) - 0.5
    std = 0.3
    config = scheduler_config(prediction_type=prediction)
    template = DiscreteTimeDenoiser(torch.nn.Identity(), DDPMScheduler.from_config(config).alphas_cumprod)
    net = tiny_unet(size=8, cls=GaussianEpsilon).setup(mu, std, template.log_sigmas, prediction)
    denoiser = from_diffusers(net, config)
    exact = GaussianDenoiser(mu, std=std, dtype=torch.float64)
    low, high = denoiser.sigma_range
    table = denoiser.log_sigmas.exp()
    between = torch.logspace(math.log10(low), math.log10(high), 50, dtype=torch.float64)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    for sigma in [*table[::37].tolist(), *between.tolist()]:
        noisy = (mu + sigma * x).float()
        with torch.no_grad():
            torch.testing.assert_close(denoiser(noisy, sigma).double(), exact(noisy.double(), sigma),
                                       rtol=1e-5, atol=1e-5 * (1 + sigma))
    y = mu[None] + std * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    log_p = log_likelihood(denoiser, y, None, low, high, steps=128)
    torch.testing.assert_close(log_p / 64, exact.log_likelihood(y, low, high) / 64, atol=0.01, rtol=0)


# ---- loading, recording, refusing -----------------------------------------------------------------------------

def save_pipeline(directory, prediction="epsilon", seed=0, **unet_changes):
    """A DDPMPipeline's directory (unet/, scheduler/, model_index.json), as save_pretrained writes it."""
    scheduler = DDPMScheduler(prediction_type=prediction, clip_sample=False)
    DDPMPipeline(unet=tiny_unet(seed, **unet_changes), scheduler=scheduler).save_pretrained(directory)
    return directory


def test_a_pipelines_directory_and_a_models_own_load_alike(tmp_path):
    pipeline = save_pipeline(tmp_path / "pipeline")
    flat = tmp_path / "flat"
    UNet2DModel.from_pretrained(pipeline / "unet").save_pretrained(flat)
    DDPMScheduler.from_pretrained(pipeline / "scheduler").save_pretrained(flat)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([0.05, 1.0, 40.0])
    outputs, records = [], []
    for directory in (pipeline, flat):
        denoiser, record = load_pretrained(AuxSpec(name="pre", pretrained=str(directory)), SHAPE)
        with torch.no_grad():
            outputs.append(denoiser(x, sigma))
        records.append(record)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    saved = from_diffusers(tiny_unet(0), scheduler_config())
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"] == weights_sha256(saved)
    assert (records[0]["subfolder"], records[0]["scheduler_subfolder"]) == ("unet", "scheduler")
    assert (records[1]["subfolder"], records[1]["scheduler_subfolder"]) == (None, None)
    assert records[0]["schedule"]["beta_schedule"] == "linear" and records[0]["prediction_type"] == "epsilon"
    low, high = records[0]["sigma_range"]
    assert low == pytest.approx((1e-4 / (1 - 1e-4)) ** 0.5, rel=1e-4) and 100 < high < 200
    assert weights_sha256(from_diffusers(tiny_unet(1), scheduler_config())) != records[0]["weights_sha256"]


def test_a_scorefuse_export_loads_from_its_directory_or_its_weights(tmp_path):
    from trainer.export import build_denoiser, export_denoiser
    meta = {"preset": "tiny", "dropout": 0.0, "image_size": SHAPE[-1], "channels": 1, "sigma_data": 0.5,
            "population": "elsewhere"}
    export_denoiser(tmp_path, build_denoiser(meta), meta)
    for given in (tmp_path, tmp_path / "ema.safetensors"):
        denoiser, record = load_pretrained(AuxSpec(name="other", pretrained=str(given)), SHAPE)
        assert record["kind"] == "scorefuse" and record["model"] == meta and record["sigma_range"] is None
        assert not hasattr(denoiser, "sigma_range")


def unsupported(tmp_path, name, change):
    directory = save_pipeline(tmp_path / name)
    path = directory / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return directory


def truncated(weights):
    """Cut a weights file short; the model's directory (two levels up)."""
    weights.write_bytes(weights.read_bytes()[:1000])
    return weights.parents[1]


REFUSALS = {
    "pickle": (lambda d: (d / "network-snapshot.pkl").write_bytes(b"\x80\x04K\x01.") and d / "network-snapshot.pkl",
               r"pretrained=.*network-snapshot\.pkl is a pickle, which runs code when loaded and is refused; "
               r"export its weights to safetensors"),
    "resolution": (lambda d: save_pipeline(d / "wide", size=32),
                   r"pretrained=.*wide makes 1x32x32 images \(channels x height x width\) and the run's are 1x8x8"),
    "channels": (lambda d: save_pipeline(d / "rgb", channels=3),
                 r"pretrained=.*rgb makes 3x8x8 images .* the run's are 1x8x8"),
    "schedule": (lambda d: unsupported(d, "sigmoid", {"beta_schedule": "sigmoid"}),
                 r"pretrained=.*sigmoid: beta_schedule 'sigmoid' of DDPMScheduler is not handled \(handled: linear, "
                 r"scaled_linear, squaredcos_cap_v2\)"),
    "prediction": (lambda d: unsupported(d, "sample", {"prediction_type": "sample"}),
                   r"pretrained=.*sample: prediction_type 'sample' is not handled \(handled: epsilon, v_prediction\)"),
    "not a model": (lambda d: (d / "empty").mkdir() or d / "empty",
                    r"pretrained=.*empty: not a diffusers model \(no config.json in it or in unet/\) nor a "
                    r"scorefuse export \(ema.safetensors \+ model.json\)"),
    "no schedule": (lambda d: shutil.rmtree(save_pipeline(d / "unscheduled") / "scheduler") or d / "unscheduled",
                    r"pretrained=.*unscheduled: no scheduler_config.json beside the model or in scheduler/"),
    "damaged weights": (lambda d: truncated(save_pipeline(d / "damaged") / "unet" /
                                            "diffusion_pytorch_model.safetensors"),
                        r"pretrained=.*damaged: Unable to load weights from checkpoint file"),
    "offline hub": (lambda d: "scorefuse-tests/no-such-ddpm",
                    r"pretrained=scorefuse-tests/no-such-ddpm: not in the local hub cache, and the hub "
                    r"\(https://huggingface.co\) could not be reached"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_is_refused_is_named_in_one_line(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make, message = REFUSALS[case]
    source = make(tmp_path)
    with pytest.raises((ConfigError, ModelError), match=message) as refused:
        load_pretrained(AuxSpec(name="pre", pretrained=str(source)), SHAPE)
    assert "\n" not in str(refused.value)


def pretrained_config(tmp_path, pretrained: str) -> str:
    """configs/digits.yaml with a fourth auxiliary, pretrained ("pre"), and without what such a run cannot do
    (checkpoint-merge). Its populations are the digits': the same prepared shards."""
    cfg = OmegaConf.load(DIGITS)
    cfg.data.aux.append({"name": "pre", "pretrained": pretrained})
    cfg.fuse.baselines = ["target-scratch", "target-finetune"]
    path = tmp_path / "pretrained.yaml"
    OmegaConf.save(cfg, path)
    return str(path)


def test_a_refusal_through_the_cli_exits_2_and_writes_nothing(digits_run, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source, message in ((save_pipeline(tmp_path / "wide", size=32), "makes 1x32x32 images"),
                            ("scorefuse-tests/no-such-ddpm", "the hub (https://huggingface.co) could not be reached")):
        config = pretrained_config(tmp_path, str(source))
        code, out, err = scorefuse_here(capfd, "train-aux", "--config", config, f"root={digits_run.parent}", "aux=pre")
        assert code == 2, err
        assert err.strip().count("\n") == 0 and message in err, err
        assert not (digits_run / "aux" / "pre").exists()


def test_config_keys_of_pretrained_auxiliaries(tmp_path):
    config = pretrained_config(tmp_path, "owner/model")
    cfg = load_config(config, ["data.aux.3.revision=v1"])
    assert (cfg.data.aux[3].pretrained, cfg.data.aux[3].revision, cfg.data.aux[3].count) == ("owner/model", "v1", 0)
    refused = {
        "data.aux.3.count=5": r"data.aux.3 \(pre\) is the pretrained model owner/model, not a population",
        "data.aux.0.subfolder=unet": r"data.aux.0.subfolder names a version of a pretrained model",
        "data.aux.3.timesteps=nearest": r"data.aux.3.timesteps: 'nearest' is not interpolate \| round",
        "fuse.baselines=[checkpoint-merge]": r"fuse.baselines: checkpoint-merge averages the weights",
        "distill.warm_from=merge": r"distill.warm_from=merge: the generator and score network start from a weight",
    }
    for override, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_config(config, [override])


def test_a_pretrained_auxiliary_leaves_the_shards_and_their_fingerprint_alone(tmp_path):
    with_model, without = load_config(pretrained_config(tmp_path, "owner/model")), load_config(DIGITS)
    assert [p.name for _, p in ordered_populations(with_model.data)] == \
        [p.name for _, p in ordered_populations(without.data)]
    assert data_fingerprint(with_model.data) == data_fingerprint(without.data)


def test_a_recorded_model_whose_weights_changed_is_refused(tmp_path):
    source = save_pipeline(tmp_path / "ddpm")
    aux, path = AuxSpec(name="pre", pretrained=str(source)), tmp_path / "pretrained.json"
    save_record(load_pretrained(aux, SHAPE)[1], path)
    assert weights_sha256(load_recorded(aux, path)) == json.loads(path.read_text())["weights_sha256"]
    with pytest.raises(ConfigError, match=r"timesteps=round, but .* recorded .*, None, interpolate"):
        load_recorded(AuxSpec(name="pre", pretrained=str(source), timesteps="round"), path)
    save_pipeline(source, seed=1)  # the same directory, other weights
    with pytest.raises(CheckpointError, match=r"auxiliary pre: the weights of .*ddpm changed since they were recorded"):
        load_recorded(aux, path)


def test_the_lambda_fits_sigma_draws_stay_in_the_common_range():
    objective = objective_of("edm", -1.2, 1.2, 0.5)
    sigma = objective.within((0.1, 2.0)).sample(4000, torch.Generator().manual_seed(10), torch.device("cpu"))
    assert float(sigma.min()) == pytest.approx(0.1) and float(sigma.max()) == pytest.approx(2.0)
    unclamped = objective.sample(4000, torch.Generator().manual_seed(10), torch.device("cpu"))
    torch.testing.assert_close(sigma, unclamped.clamp(0.1, 2.0), rtol=0, atol=0)
    assert objective.within(None) is objective


@pytest.mark.parametrize("name", ["cifar10_pretrained", "lsun_pretrained"])
def test_the_pretrained_configs_load(name, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"data.source.path={data}"])
    assert any(a.pretrained for a in cfg.data.aux)
    if all(a.pretrained for a in cfg.data.aux):  # what starts from an auxiliary trained here is refused
        for baseline in ("target-finetune", "seed-ensemble"):
            with pytest.raises(ConfigError, match=f"fuse.baselines: {baseline} starts from an auxiliary trained here"):
                load_config(ROOT / "configs" / f"{name}.yaml", [f"data.source.path={data}", f"fuse.baselines=[{baseline}]"])


# ---- the pipeline ----------------------------------------------------------------------------------------------

def briefly_trained_pipeline(directory, images: torch.Tensor, steps: int = 40):
    """A tiny UNet2DModel trained by DDPM's epsilon loss for a few steps on images in [-1, 1], saved as a
    DDPMPipeline."""
    unet, scheduler = tiny_unet(7), DDPMScheduler(clip_sample=False)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(8)
    unet.train()
    for _ in range(steps):
        x0 = images[torch.randint(len(images), (32,), generator=generator)]
        t = torch.randint(1000, (32,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_a_pretrained_auxiliary_fuses_with_trained_ones_through_the_cli(fuse_pending, tmp_path):
    from shards.pixels import to_unit
    from shards.stream import read_population
    run, overrides = fuse_pending
    images = to_unit(read_population(run / "data", "aux-low")[0])
    config = pretrained_config(tmp_path, str(briefly_trained_pipeline(tmp_path / "ddpm", images)))
    recorded = scorefuse("train-aux", "--config", config, *overrides, "aux=pre")
    assert "aux pre: pretrained" in recorded.stderr and "recorded in" in recorded.stderr
    record = json.loads((run / "aux" / "pre" / "pretrained.json").read_text())
    assert record["kind"] == "diffusers" and record["subfolder"] == "unet"
    fused = scorefuse("run", "--config", config, *overrides, "fuse.router_samples=64", "fuse.hybrid_sigma=null",
                      "stages=fuse,distill,evaluate")
    assert "router: 64 samples of aux/pre in" in fused.stderr
    drawn = json.loads((run / "fuse" / "mixture.json").read_text())["router_samples"]
    assert list(drawn) == ["pre"] and drawn["pre"]["images"] == 64 and drawn["pre"]["seconds"] > 0
    fit = json.loads((run / "fuse" / "lambda.json").read_text())
    assert fit["names"] == ["aux-low", "aux-high", "aux-even", "pre"]
    assert fit["sigma_range"] == pytest.approx(record["sigma_range"])  # the trained ones are valid at every sigma
    for which in ("exact", "sgd"):
        lam = torch.tensor(fit[which]["lambda"]).flatten()
        assert (lam >= -1e-12).all() and float(lam.sum()) == pytest.approx(1, abs=1e-6)
    report = json.loads((run / "report.json").read_text())
    text = json.dumps(report)
    for label in ("aux/aux-low", "aux/aux-high", "aux/pre", "fused-exact", "fused-sgd", "fused-mixture",
                  "target-finetune", "distill"):
        assert f'"{label}"' in text, label
    assert "pretrained " in text and "valid for sigma" in text and "router trained on 64 samples of pre" in text
    low = max(0.002, record["sigma_range"][0])
    assert f"probability-flow ODE from sigma {low:.4g} to 80" in (run / "report.md").read_text()
    teacher = json.loads((run / "distill" / "teacher" / "manifest.json").read_text())["teacher"]
    assert teacher["names"] == fit["names"] and teacher["warm"] != "aux/pre"  # warm from one trained here
    scorefuse("sample", "--config", config, *overrides, "model=aux/pre", "n=4", f"out={tmp_path / 'pre.npz'}")
    assert np.load(tmp_path / "pre.npz")["images"].shape == (4, *SHAPE[1:], 1)
