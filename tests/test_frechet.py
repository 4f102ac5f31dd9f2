"""Fréchet distance through torch-fidelity: Inception loading, errors, ranks, the reference cache, names."""
import threading
import urllib.error

import numpy as np
import pytest
import torch
import torch_fidelity
from threadpoolctl import threadpool_limits
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from evaluation.digit_classifier import DigitClassifier, one_thread, save_digit_classifier
from evaluation.errors import EvaluationError
from evaluation.frechet import FrechetEvaluator, SampleGenerator, metric_name

SHAPE = (1, 16, 16)


def reference_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random grey blobs, uint8 [n, 1, 16, 16]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 4, 4, generator=g)
    return (nn.functional.interpolate(coarse, size=16, mode="bilinear") * 255).round().to(torch.uint8)


def tanh_sampler(latents: torch.Tensor) -> torch.Tensor:
    return torch.tanh(0.5 * latents)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file with exactly the keys and shapes torch-fidelity's Inception loads, kaiming-random.

    The real constructor builds the layers; only its load_state_dict is skipped (it is handed an empty
    checkpoint), so any key or shape torch-fidelity expects is in the file. The numbers are not FID.
    """
    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    path = folder / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def digit_weights(tmp_path_factory):
    """An untrained digit classifier: enough to check plumbing, where only equality of features matters."""
    path = tmp_path_factory.mktemp("digits") / "classifier.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_digit_classifier(DigitClassifier(16), path, accuracy=0.0)
    return path


def test_inception_distance_with_local_weights(inception_weights, tmp_path):
    # Two threads each (torch, and BLAS for the 2048x2048 eigenvalues) on a shared 2-core machine ran this
    # 6x slower (83 s instead of 13 s) when another process held a core.
    with one_thread(), threadpool_limits(1):
        check_inception_distance(inception_weights, tmp_path)


def check_inception_distance(inception_weights, tmp_path):
    evaluator = FrechetEvaluator("inception", str(inception_weights), tmp_path, batch_size=16)
    reference = reference_images(16)
    stats = evaluator.reference_statistics("blobs", lambda: reference)
    assert stats[0].shape == (2048,) and stats[1].shape == (2048, 2048)

    generated = evaluator.distance(tanh_sampler, SHAPE, 16, stats)
    same = evaluator.distance(lambda z: reference.float() / 127.5 - 1, SHAPE, 16, stats)
    brighter = evaluator.distance(lambda z: (reference.float() / 127.5 - 1) * 0.5 + 0.5, SHAPE, 16, stats)

    assert np.isfinite(generated) and generated >= 0
    assert abs(same) < 1e-4 * brighter
    assert brighter > 0


def test_missing_weights_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    for extractor in ("inception", "digit-classifier"):
        with pytest.raises(EvaluationError, match="nowhere"):
            FrechetEvaluator(extractor, str(missing), tmp_path)
    with pytest.raises(EvaluationError, match="needs a weights file"):
        FrechetEvaluator("digit-classifier", None, tmp_path)
    with pytest.raises(EvaluationError, match="unknown feature extractor"):
        FrechetEvaluator("vgg", None, tmp_path)


def test_failed_inception_download_says_what_to_configure(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(EvaluationError, match="eval.inception_weights.*pt_inception-2015-12-05-6726825d.pth"):
        FrechetEvaluator("inception", None, tmp_path)


def run_ranks(world_size, fn):
    """Run fn(rank, gather) in one thread per rank; gather concatenates in rank order, like accelerator.gather."""
    slots, results = [None] * world_size, [None] * world_size
    barrier = threading.Barrier(world_size, timeout=60)  # a rank that dies fails the test, not hangs it

    def gather_for(rank):
        def gather(tensor):
            slots[rank] = tensor
            barrier.wait()
            out = torch.cat(slots)
            barrier.wait()
            return out
        return gather

    def target(rank):
        results[rank] = fn(rank, gather_for(rank))

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_distance_does_not_depend_on_world_size(digit_weights, tmp_path, world_size):
    evaluator = FrechetEvaluator("digit-classifier", str(digit_weights), tmp_path, batch_size=8)
    reference = evaluator.reference_statistics("blobs", lambda: reference_images(32))
    single = evaluator.distance(tanh_sampler, SHAPE, 20, reference, seed=3)

    calls = [0] * world_size

    def on_rank(rank, gather):
        def sample_fn(latents):
            calls[rank] += 1
            return tanh_sampler(latents)
        return evaluator.distance(sample_fn, SHAPE, 20, reference, seed=3, rank=rank, world_size=world_size,
                                  gather=gather)

    assert run_ranks(world_size, on_rank) == [single] * world_size
    assert len(set(calls)) == 1, f"ranks ran different numbers of batches: {calls}"
    assert evaluator.distance(tanh_sampler, SHAPE, 20, reference, seed=4) != single


def test_reference_statistics_are_cached(digit_weights, tmp_path):
    loads = []

    def load_images():
        loads.append(1)
        return reference_images(24)

    first = FrechetEvaluator("digit-classifier", str(digit_weights), tmp_path).reference_statistics("pop", load_images)
    again = FrechetEvaluator("digit-classifier", str(digit_weights), tmp_path).reference_statistics("pop", load_images)
    assert len(loads) == 1
    assert (tmp_path / "digit-classifier-pop.npz").is_file()
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])

    other_weights = tmp_path / "other.safetensors"
    save_digit_classifier(DigitClassifier(16), other_weights, accuracy=0.0)
    FrechetEvaluator("digit-classifier", str(other_weights), tmp_path).reference_statistics("pop", load_images)
    assert len(loads) == 2, "statistics made with other extractor weights must be recomputed"


def test_sample_generator_inside_torch_fidelity(digit_weights, tmp_path):
    reference = reference_images(16)

    class Reference(torch.utils.data.Dataset):
        def __len__(self):
            return len(reference)

        def __getitem__(self, i):
            return reference[i].expand(3, -1, -1)

    z_size = int(np.prod(SHAPE))
    model = torch_fidelity.GenerativeModelModuleWrapper(SampleGenerator(tanh_sampler, SHAPE), z_size, "normal", 0)
    metrics = torch_fidelity.calculate_metrics(
        input1=model, input1_model_num_samples=12, input2=Reference(), fid=True,
        feature_extractor="digit-classifier", feature_extractor_weights_path=str(digit_weights),
        cuda=False, cache=False, verbose=False, save_cpu_ram=True, rng_seed=2020)

    # The same 12 latents torch-fidelity drew (one batch from RandomState(2020)), through our own path.
    evaluator = FrechetEvaluator("digit-classifier", str(digit_weights), tmp_path)
    mu, sigma = evaluator.reference_statistics("blobs", lambda: reference)
    z = torch.from_numpy(np.random.RandomState(2020).randn(12, z_size)).float()
    stats = fid_features_to_statistics(evaluator.extract(SampleGenerator(tanh_sampler, SHAPE)(z)))
    expected = fid_statistics_to_metric(stats, {"mu": mu, "sigma": sigma}, verbose=False)[KEY_METRIC_FID]
    assert metrics[KEY_METRIC_FID] == pytest.approx(expected, rel=1e-5)


def test_metric_names():
    assert metric_name("inception", 2000) == "fid2k"
    assert metric_name("inception", 50000) == "fid50k"
    assert metric_name("inception", 64) == "fid64"
    assert metric_name("inception", 2500) == "fid2500"
    assert metric_name("digit-classifier", 2000) == "fd_digits2k"
    with pytest.raises(EvaluationError):
        metric_name("clip", 100)


def test_kept_samples_are_the_ones_measured(tmp_path):
    """keep_images returns exactly the samples whose features were measured, in sample order."""
    from evaluation.frechet import FrechetEvaluator
    import evaluation.frechet as frechet_module
    evaluator = FrechetEvaluator.__new__(FrechetEvaluator)  # no extractor weights needed: features = pixels
    evaluator.batch_size, evaluator.device = 4, torch.device("cpu")
    evaluator.extract = lambda images: frechet_module.as_extractor_input(images).flatten(1).float()
    features, images = evaluator.sample_features(lambda z: z.tanh(), (1, 4, 4), 10, keep_images=True)
    assert images.shape == (10, 3, 4, 4) and images.dtype == torch.uint8
    assert torch.equal(features, images.flatten(1).float())
    assert evaluator.sample_features(lambda z: z.tanh(), (1, 4, 4), 10)[1] is None
