"""FusedDenoiser and checkpoint merging on real `tiny` UNet denoisers: the vmapped evaluation (the default on
CUDA) equals the loop in float32 and under bf16 autocast, one-hot weights reproduce a model bit for bit, and
the Gram statistics of a pass split over two processes (gloo) equal the one-process statistics."""
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.lambda_fit import accumulate_gram, edm_objective
from trainer.edm import heun_sample
from trainer.export import build_denoiser
from shards.errors import ModelError
from trainer.fused_denoiser import FusedDenoiser, merge_weights
from stages.fuse import target_batches

META = dict(preset="tiny", image_size=16, channels=1, sigma_data=0.5)
EDM = dict(p_mean=-1.2, p_std=1.2, sigma_data=0.5)
OBJECTIVE = edm_objective(**EDM)


def tiny(seed: int, **changes):
    """A `tiny` denoiser with random weights everywhere (the UNet's zero-initialised output layers
    would make every freshly built model the same function)."""
    torch.manual_seed(seed)
    denoiser = build_denoiser({**META, **changes})
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return denoiser.eval().requires_grad_(False)


def test_batched_evaluation_equals_the_loop():
    models = [tiny(seed) for seed in range(3)]
    x, sigma = torch.randn(8, 1, 16, 16), torch.logspace(-2, 1.5, 8)
    batched = FusedDenoiser(models, torch.tensor([0.2, 0.5, 0.3]), batched=True)
    looped = FusedDenoiser(models, torch.tensor([0.2, 0.5, 0.3]), batched=False)
    assert batched.same_architecture
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap warns when an op has no batching rule and runs once per model
        outputs = batched.all_outputs(x, sigma)
        fused = batched(x, sigma)
    assert batched.batched
    with torch.no_grad():
        expected = looped.all_outputs(x, sigma)
        assert torch.equal(expected, torch.stack([m(x, sigma) for m in models]))
        torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused, looped(x, sigma), rtol=1e-5, atol=1e-5)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2  # the models really differ


def test_batched_evaluation_honours_bf16_autocast():
    """vmap's batched convolutions bypass autocast; the batched path must still compute in bf16 under bf16
    autocast (on a GPU it is the default path of the Gram pass and the SGD fit), agreeing with the loop at
    bf16 precision and not with float32."""
    models = [tiny(seed) for seed in range(3)]
    x, sigma = torch.randn(8, 1, 16, 16), torch.logspace(-2, 1.5, 8)
    batched = FusedDenoiser(models, torch.tensor([0.2, 0.5, 0.3]), batched=True)
    looped = FusedDenoiser(models, torch.tensor([0.2, 0.5, 0.3]), batched=False)
    with torch.no_grad():
        full = looped.all_outputs(x, sigma)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loop_bf16, vmap_bf16 = looped.all_outputs(x, sigma), batched.all_outputs(x, sigma)
    assert vmap_bf16.dtype == torch.float32  # D itself stays float32 (trainer.edm.Denoiser)
    bf16_error = (loop_bf16 - full).abs().max()
    assert bf16_error > 1e-4  # the loop really ran in bf16 ...
    assert (vmap_bf16 - full).abs().max() > 0.25 * bf16_error  # ... and so did the batched path
    torch.testing.assert_close(vmap_bf16, loop_bf16, rtol=0, atol=4 * float(bf16_error))


def test_batched_evaluation_needs_one_architecture():
    with pytest.raises(ModelError, match="one architecture"):
        FusedDenoiser([tiny(0), tiny(1, dropout=0.5)], torch.tensor([0.5, 0.5]), batched=True)


def test_one_hot_weights_reproduce_the_model_exactly():
    models = [tiny(seed) for seed in range(3)]
    latents = torch.randn(2, 1, 16, 16)
    for j in range(3):
        fused = FusedDenoiser(models, torch.eye(3)[j], batched=True)
        x, sigma = torch.randn(4, 1, 16, 16), torch.tensor([0.01, 0.3, 2.0, 40.0])
        with torch.no_grad():
            assert torch.equal(fused(x, sigma), models[j](x, sigma))
        assert torch.equal(heun_sample(fused, latents, num_steps=4), heun_sample(models[j], latents, num_steps=4))


def test_auxiliaries_stay_frozen_in_train_mode():
    fused = FusedDenoiser([tiny(0), tiny(1, dropout=0.5)], torch.tensor([0.5, 0.5]))
    fused.train()
    assert not any(m.training for m in fused.denoisers.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    # different dropout (a setting, not a tensor) is a different architecture: no vmap
    assert not fused.same_architecture


def test_channel_mismatch_is_named_at_the_first_call():
    fused = FusedDenoiser([tiny(0), tiny(1, channels=3)], torch.tensor([0.5, 0.5]), names=["grey", "colour"])
    assert not fused.same_architecture
    with pytest.raises(ModelError, match="colour failed"):
        fused(torch.randn(2, 1, 16, 16), 1.0)


def test_merge_weights():
    models = [tiny(seed) for seed in range(3)]
    for j in range(3):
        merged = merge_weights(models, torch.eye(3)[j])
        state = models[j].state_dict()
        assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)
    lam = torch.tensor([0.2, 0.5, 0.3])
    merged = merge_weights(models, lam)
    key = "net.input_conv.weight"
    expected = sum(w.double() * m.state_dict()[key].double() for w, m in zip(lam, models)).float()
    torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-7)
    rebuilt = build_denoiser(META)
    rebuilt.load_state_dict(merged)  # a loadable checkpoint of the same architecture


def test_merge_weights_rejects_different_architectures():
    with pytest.raises(ModelError, match="different architectures"):
        merge_weights([tiny(0), tiny(1, channels=3)], torch.tensor([0.5, 0.5]))
    with pytest.raises(ModelError, match="sigma_data"):
        merge_weights([tiny(0), tiny(1, sigma_data=1.0)], torch.tensor([0.5, 0.5]))


def test_bf16_autocast_gram_is_close_to_float32():
    fused = FusedDenoiser([tiny(seed) for seed in range(2)], torch.tensor([0.5, 0.5]))
    batches = [torch.rand(4, 1, 16, 16) * 2 - 1]
    full = accumulate_gram(fused, batches, 2, OBJECTIVE, generator=torch.Generator().manual_seed(0))
    bf16 = accumulate_gram(fused, batches, 2, OBJECTIVE, generator=torch.Generator().manual_seed(0),
                           autocast_dtype=torch.bfloat16)
    assert bf16.A.dtype == torch.float64
    torch.testing.assert_close(bf16.A, full.A, rtol=0.05, atol=0)
    assert not torch.equal(bf16.A, full.A)  # the networks did run in bf16


# --- the same Gram statistics from one process and from two -------------------------------------

IMAGES, BATCH, DRAWS, EDGES = 12, 2, 2, [0.5]


def gram_stats(rank: int, world: int, reduce=None):
    """The fuse stage's Gram pass over this rank's share of the target images (stages.fuse.target_batches), batch i
    to rank i % world as shards.stream.population_batches deals them."""
    images = torch.randint(0, 256, (IMAGES, 1, 16, 16), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    fused = FusedDenoiser([tiny(seed) for seed in range(3)], torch.full((3,), 1 / 3))
    shares = ((index, batch) for index, batch in enumerate(images.split(BATCH)) if index % world == rank)
    batches = target_batches(shares, seed=0)
    return accumulate_gram(fused, batches, DRAWS, OBJECTIVE, sigma_edges=EDGES, reduce=reduce)


def all_reduce_sum(tensor):
    dist.all_reduce(tensor)
    return tensor


def gram_worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stats = gram_stats(rank, world, reduce=all_reduce_sum)
        torch.save(vars(stats), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_gram_statistics_are_the_same_on_one_and_two_processes(tmp_path):
    single = gram_stats(0, 1)
    path = str(tmp_path / "stats")
    mp.spawn(gram_worker, args=(2, free_port(), path), nprocs=2, join=True)
    for rank in range(2):
        split = torch.load(f"{path}.{rank}")
        assert torch.equal(split["n"], single.n) and single.n.min() > 0
        for name in ("A", "b", "c"):
            torch.testing.assert_close(split[name], getattr(single, name), rtol=1e-12, atol=0)
        torch.testing.assert_close(split["sigma_edges"], single.sigma_edges)
