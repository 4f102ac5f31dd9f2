"""The stages' tensor math with its tensors on a (fake) CUDA device, so that a tensor left on the CPU fails here as
it would on a GPU (tests/fake_cuda.py says what that catches and what it cannot). Each test runs the real
function end to end on tiny inputs and, where the math is deterministic, checks it gives the CPU's answer."""
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from evaluation.features import Ranks
from evaluation.likelihood import nll_bits_per_dim
from evaluation.score_matching import held_out_loss
from tests.fake_cuda import fake_cuda
from stages.catalogue import draw
from trainer.edm import Denoiser, denoising_loss, heun_sample
from trainer.fused_denoiser import FusedDenoiser
from stages.fuse import sgd_fit_parts
from trainer.lambda_fit import accumulate_gram, edm_objective, paper_objective
from trainer.mixture import MixtureDenoiser, em_mixture_weights
from trainer.precision import with_autocast
from trainer.router import Router, calibration, log_density_ratios, router_loss
from trainer.score_mismatch import OneStepGenerator, ScoreNet, check_shapes, d_step_loss, g_step_loss, r1_step_loss
from shards.seeds import Stream, generator
from stages.evaluate import gather_by_index, rank_share
from stages.fuse import fit_mixture
from trainer.unet import build_unet

SIZE, BATCH = 8, 2
SHAPE = (1, SIZE, SIZE)
CPU = torch.device("cpu")
# The vmapped evaluation of the auxiliaries is what CUDA selects by default (batched=None); the loop is the other.
BATCHED = pytest.mark.parametrize("batched", [False, True], ids=["loop", "vmap"])
# On the fake device some operations take another CPU kernel than on the CPU (attention: the math kernel, not the
# fused CPU one), so results agree to float32 rounding, not bit for bit.
FLOAT32 = dict(rtol=1e-4, atol=1e-4)


def tiny(seed: int) -> Denoiser:
    """A `tiny` UNet denoiser with random weights everywhere (the zero-initialised output layers would make all
    of them the same function)."""
    torch.manual_seed(seed)
    denoiser = Denoiser(build_unet("tiny", SIZE, 1))
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return denoiser.eval().requires_grad_(False)


def router() -> Router:
    torch.manual_seed(2)
    return Router(SIZE, 1, 2).eval().requires_grad_(False)


def images(count: int = BATCH) -> torch.Tensor:
    return torch.randint(0, 256, (count, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def unit_images() -> torch.Tensor:
    return images().float() / 127.5 - 1


def test_em_mixture_weights_runs_on_the_device_of_its_input():
    log_r = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = em_mixture_weights(log_r)
    with fake_cuda() as cuda:
        pi, log_likelihood = em_mixture_weights(log_r.to(cuda))
    assert pi.device == CPU  # as documented: pi comes back on the CPU, whatever the device of the ratios
    assert torch.equal(pi, expected[0]) and log_likelihood == expected[1]


@pytest.mark.parametrize("batched, objective", [(False, edm_objective(-1.2, 1.2, 0.5)),
                                                (True, edm_objective(-1.2, 1.2, 0.5)), (True, paper_objective())],
                         ids=["edm-loop", "edm-vmap", "paper-vmap"])
def test_gram_pass(batched, objective):
    """One pass as fit_lambda runs it: the batches on the device, their generators on the CPU; sigma bins."""
    fused = FusedDenoiser([tiny(0), tiny(1)], [0.5, 0.5], batched=batched)
    expected = accumulate_gram(fused, [(unit_images(), generator(0, Stream.GRAM, 0))], 2, objective, sigma_edges=[0.5])
    with fake_cuda() as cuda:
        stats = accumulate_gram(fused.to(cuda), [(unit_images().to(cuda), generator(0, Stream.GRAM, 0))], 2,
                                objective, sigma_edges=[0.5])
    assert stats.A.device == CPU
    torch.testing.assert_close(stats.A, expected.A, **FLOAT32)
    torch.testing.assert_close(stats.b, expected.b, **FLOAT32)


def test_gram_pass_draws_from_the_global_rng_and_reduces_on_the_device():
    """Plain batches draw from torch's global RNG on the device; the sums handed to the all-reduce are on the device,
    as NCCL requires (the stand-in reduce of one rank checks it)."""
    fused = FusedDenoiser([tiny(0), tiny(1)], [0.5, 0.5])
    with fake_cuda() as cuda:
        def all_reduce(sums):
            assert sums.device == cuda, "NCCL reduces device tensors only"
            return sums
        stats = accumulate_gram(fused.to(cuda), [unit_images().to(cuda)], 1, edm_objective(-1.2, 1.2, 0.5),
                                reduce=all_reduce)
    assert torch.isfinite(stats.A).all()


@BATCHED
def test_fused_denoiser_forward(batched):
    """Sigma as the sampler passes it ([B, 1, 1, 1] on the device), as a number, and per sample on the CPU;
    lambda in sigma bins, with a one-hot bin (which runs one network only)."""
    fused = FusedDenoiser([tiny(0), tiny(1)], [[0.3, 0.7], [1.0, 0.0]], sigma_edges=[1.0], batched=batched)
    x, sigma = torch.randn(BATCH, *SHAPE), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        expected = fused(x, sigma)
    with fake_cuda() as cuda, torch.no_grad():
        fused = fused.to(cuda)
        out = fused(x.to(cuda), sigma.to(cuda).reshape(-1, 1, 1, 1))
        assert fused.uses_batched(cuda) == batched
        assert fused(x.to(cuda), 0.5).device == cuda
        assert fused(x.to(cuda), 5.0).device == cuda
        assert fused(x.to(cuda), sigma).device == cuda
    torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.parametrize("batched, skip", [(False, 0.0), (True, 0.0), (True, 0.4)], ids=["loop", "vmap", "vmap-skip"])
def test_mixture_denoiser_forward(batched, skip):
    mixture = MixtureDenoiser([tiny(0), tiny(1)], router(), [0.6, 0.4], batched=batched, skip=skip)
    x, sigma = torch.randn(BATCH, *SHAPE), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        expected = mixture(x, sigma)
    with fake_cuda() as cuda, torch.no_grad():
        out = mixture.to(cuda)(x.to(cuda), sigma.to(cuda).reshape(-1, 1, 1, 1))
        assert mixture(x.to(cuda), 0.5).device == cuda
    torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "vmap"])
def test_auxiliaries_under_cuda_bf16_autocast(batched):
    """The harness runs CUDA's autocast policy: the networks compute in bf16, D stays float32 and agrees with the
    float32 result at bf16 precision. (CUDA's autocast runs upsampling and group_norm in float32, the CPU's does
    not: the vmapped path once handed such a float32 input to a bf16 convolution, which only shows here.)"""
    fused = FusedDenoiser([tiny(0), tiny(1)], [0.5, 0.5], batched=batched)
    x, sigma = torch.randn(BATCH, *SHAPE), torch.ones(BATCH)
    with torch.no_grad():
        expected = fused.all_outputs(x, sigma)
    with fake_cuda() as cuda, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused.to(cuda).all_outputs(x.to(cuda), sigma.to(cuda)).cpu()
    assert out.dtype == torch.float32 and 0 < (out - expected).abs().max() < 0.05


def test_router_posterior_and_loss():
    model, x0 = router(), unit_images()
    expected = log_density_ratios(model, x0, 0.05, 2, generator(0, Stream.MIXTURE))
    with fake_cuda() as cuda:
        model = model.to(cuda)
        log_r = log_density_ratios(model, x0.to(cuda), 0.05, 2, generator(0, Stream.MIXTURE))
        loss = router_loss(model.requires_grad_(True), x0.to(cuda), torch.tensor([0, 1], device=cuda), 0.002, 80.0)
        loss.backward()
        assert model.head.weight.grad.device == cuda
    torch.testing.assert_close(log_r.cpu(), expected)


def test_router_calibration():
    """The router's check after training: its draws from CPU generators, its network on the device."""
    model, x0 = router().eval(), unit_images()

    def batches(device):
        return [(x0.to(device), torch.tensor([0, 1], device=device))] * 3
    expected = calibration(model, batches(CPU), 0.002, 80.0, 3, seed=5)
    with fake_cuda() as cuda:
        got = calibration(model.to(cuda), batches(cuda), 0.002, 80.0, 3, seed=5)
    assert [row["images"] for row in got] == [row["images"] for row in expected] and sum(r["images"] for r in got) == 6
    for mine, theirs in zip(got, expected):  # None where a band has no image
        assert [k for k in mine if mine[k] is None] == [k for k in theirs if theirs[k] is None]
        assert {k: v for k, v in mine.items() if v is not None} == pytest.approx(
            {k: v for k, v in theirs.items() if v is not None}, rel=1e-4, abs=1e-5)


def test_fit_mixture():
    """fuse's EM for pi, on the router's density ratios (computed on the device) and on the auxiliaries'
    likelihoods (on the CPU, as nll_bits_per_dim returns them), and the likelihood pi reaches (from both)."""
    def run(device):
        settings = dict(fuse=dict(router_sigma=0.05, router_draws=2, mixture_weights="router", nll_check=True),
                        eval=dict(nll_steps=1, nll_probes=1, nll_batch=2), train=dict(seed=0),
                        edm=dict(sigma_min=0.002, sigma_max=80.0, rho=7.0), data=dict(aux=[]))
        ctx = SimpleNamespace(cfg=SimpleNamespace(**{k: SimpleNamespace(**v) for k, v in settings.items()}),
                              device=device)
        return fit_mixture(ctx, [(0, images())], {"a": tiny(0), "b": tiny(1)}, router())
    expected = run(CPU)
    with fake_cuda() as cuda:
        result = run(cuda)
    for fit in ("router", "nll"):
        assert result[fit]["pi"] == pytest.approx(expected[fit]["pi"], rel=1e-4)
        assert result[fit]["nll_bits_per_dim"] == pytest.approx(expected[fit]["nll_bits_per_dim"], rel=1e-4)


@pytest.mark.parametrize("model", ["edm", "fused", "mixture"])
def test_nll_step(model):
    """One Heun step of the likelihood ODE with one probe, for each kind of denoiser it is given: a network, and
    the fused models that it differentiates one network at a time (weighted_networks)."""
    denoiser = {"edm": lambda: tiny(0),
                "fused": lambda: FusedDenoiser([tiny(0), tiny(1)], [0.5, 0.5]),
                "mixture": lambda: MixtureDenoiser([tiny(0), tiny(1)], router(), [0.6, 0.4])}[model]()
    arguments = dict(indices=[0, 1], seed=0, steps=1, probes=1)
    expected = nll_bits_per_dim(denoiser, images(), **arguments)
    with fake_cuda() as cuda:
        bits = nll_bits_per_dim(denoiser.to(cuda), images(), **arguments, device=cuda)
    assert bits.device == CPU
    # float32 networks, whose kernels may round differently on the two paths: up to about 1e-6 bits/dim here
    torch.testing.assert_close(bits, expected, atol=1e-5, rtol=0)


def test_held_out_loss():
    denoiser = tiny(0)
    arguments = dict(indices=[0, 1], draws_per_image=2, p_mean=-1.2, p_std=1.2, sigma_data=0.5)
    expected = held_out_loss(denoiser, images(), **arguments)
    with fake_cuda() as cuda:
        loss = held_out_loss(denoiser.to(cuda), images(), **arguments, device=cuda)
    torch.testing.assert_close(loss, expected)


def test_score_mismatching_losses():
    G, D = OneStepGenerator(tiny(0), 80.0), ScoreNet(tiny(1))
    with fake_cuda() as cuda:
        G, D = G.to(cuda).requires_grad_(True), D.to(cuda).requires_grad_(True)
        real = unit_images().to(cuda)
        check_shapes(G, D, SHAPE, device=cuda)
        losses = [d_step_loss(D, G, real), r1_step_loss(D, real, gamma=0.1, global_batch=BATCH),
                  g_step_loss(D, G, BATCH, SHAPE, cuda)]
        sum(losses).backward()
        assert all(loss.device == cuda for loss in losses)
        assert all(p.grad is None or p.grad.device == cuda for p in [*G.parameters(), *D.parameters()])


def test_denoising_loss_and_sgd_fit_loss():
    """The training loss (generator on the CPU, as the engine seeds it) and the paper's SGD fit of lambda."""
    fused = FusedDenoiser([tiny(0), tiny(1)], [0.5, 0.5])
    modules, _, updates = sgd_fit_parts(fused, paper_objective(), sigma_edges=[1.0])
    with fake_cuda() as cuda:
        x0 = unit_images().to(cuda)
        loss = denoising_loss(tiny(0).to(cuda), x0, generator(0, Stream.GRAM, 0))
        fused.to(cuda)
        fit_loss = updates[0].loss({name: m.to(cuda) for name, m in modules.items()}, x0, 0)
        fit_loss.backward()
        assert loss.device == cuda and modules["weights"].logits.grad.device == cuda


@pytest.mark.parametrize("model", ["edm", "fused"])
def test_heun_sampler(model):
    """The sampler's schedule is made on the CPU and moved; the fused model evaluates as CUDA does by default
    (vmapped)."""
    denoiser = tiny(0) if model == "edm" else FusedDenoiser([tiny(0), tiny(1)], [0.5, 0.5])
    latents = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(4))
    expected = heun_sample(denoiser, latents, num_steps=3)
    with fake_cuda() as cuda:
        samples = heun_sample(denoiser.to(cuda), latents.to(cuda), num_steps=3)
    torch.testing.assert_close(samples.cpu(), expected, **FLOAT32)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_drawing_samples(precision):
    """evaluate's and sample's path: per-image latents drawn on the CPU, the Heun sampler on the device under the
    run's sample precision, uint8 images back on the CPU."""
    cfg = SimpleNamespace(eval=SimpleNamespace(sample_batch=BATCH), train=SimpleNamespace(seed=0))
    expected = draw(partial(heun_sample, tiny(0), num_steps=2), cfg, [1, 0], SHAPE, CPU)
    with fake_cuda() as cuda:
        images = draw(with_autocast(partial(heun_sample, tiny(0).to(cuda), num_steps=2), precision), cfg, [1, 0],
                      SHAPE, cuda)
    assert images.device == CPU and images.dtype == torch.uint8
    difference = (images.int() - expected.int()).abs()
    if precision == "no":
        assert difference.max() <= 1
    else:  # bf16's rounding, amplified by a random network, moves a few pixels by some levels (by 13 on an AMD
        # EPYC, by fewer elsewhere: CPUs differ in their bf16 kernels); other latents would move half of them
        assert difference.float().mean() <= 1 and difference.max() <= 32, difference


def test_gather_by_index():
    """As evaluate calls it: per-image values on the device, their indices on the CPU. One process (Ranks()) has no
    collective, so it needs no process group; with two, the stand-in all-gather checks that what it is handed is on
    the device, as NCCL requires."""
    values = torch.tensor([0.25, 0.75, 0.5], dtype=torch.float64)
    with fake_cuda() as cuda:
        one = gather_by_index(Ranks(), values.to(cuda), torch.tensor([1, 0, 2]), 3, cuda)

        def all_gather(share):
            assert share.device == cuda, "NCCL gathers device tensors only"
            return torch.cat([share, rank_share(values[2:].to(cuda), torch.tensor([2]), 2, cuda)])  # rank 1's
        two = gather_by_index(Ranks(0, 2, gather=all_gather), values[:2].to(cuda), torch.tensor([1, 0]), 3, cuda)
    assert one.device == two.device == CPU
    assert one.tolist() == two.tolist() == [0.75, 0.25, 0.5]


def test_the_harness_fails_where_cuda_would():
    with fake_cuda() as cuda:
        x = torch.zeros(2, 3, device=cuda)
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            x + torch.ones(3)
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            torch.randn(3, generator=torch.Generator(), device=cuda)
        with pytest.raises(RuntimeError, match="same device"):
            torch.ones(3)[torch.tensor([0, 1], device=cuda)]
        assert (x + torch.tensor(1.0)).device == cuda  # a 0-dim CPU tensor is a scalar to CUDA
        assert x[torch.tensor([1])].device == cuda  # and a CPU index is fine for a CUDA tensor
        assert math.isclose((x + 2).sum().item(), 12.0)  # values are real
