"""Feature spaces through torch-fidelity: Inception loading, errors, ranks, the reference cache, per-image
sample seeds, names."""
import threading
import urllib.error

import numpy as np
import pytest
import torch
import torch_fidelity
from threadpoolctl import threadpool_limits
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID

from evaluation.classifier import Classifier, one_thread, save_classifier
from evaluation.features import FeatureSpace, Ranks, frechet, metric_name
from shards.errors import ConfigError

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
    """An untrained classifier: enough to check plumbing, where only equality of features matters."""
    path = tmp_path_factory.mktemp("digits") / "classifier.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_classifier(Classifier(1, 16, 10), path, [str(c) for c in range(10)], accuracy=0.0)
    return path


@pytest.mark.slow  # Inception at 299x299 on the CPU and three 2048x2048 matrix square roots: ~25 s
def test_inception_distance_with_local_weights(inception_weights, tmp_path):
    # Two threads each (torch, and BLAS for the 2048x2048 eigenvalues) on a shared 2-core machine ran this
    # 6x slower (83 s instead of 13 s) when another process held a core.
    with one_thread(), threadpool_limits(1):
        check_inception_distance(inception_weights, tmp_path)


def distance(space, sample_fn, n, reference, seed=0):
    return frechet(space.sample(sample_fn, SHAPE, n, seed)[0], reference)


def check_inception_distance(inception_weights, tmp_path):
    space = FeatureSpace("inception", str(inception_weights), tmp_path, batch_size=16)
    reference = reference_images(16)
    features = space.reference("blobs", lambda: reference)
    assert features.shape == (16, 2048)

    generated = distance(space, tanh_sampler, 16, features)
    same = distance(space, lambda z: reference.float() / 127.5 - 1, 16, features)
    brighter = distance(space, lambda z: (reference.float() / 127.5 - 1) * 0.5 + 0.5, 16, features)

    assert np.isfinite(generated) and generated >= 0
    assert abs(same) < 1e-4 * brighter
    assert brighter > 0


def test_missing_weights_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    for extractor in ("inception", "classifier"):
        with pytest.raises(ConfigError, match="nowhere"):
            FeatureSpace(extractor, str(missing), tmp_path)
    with pytest.raises(ConfigError, match="needs a weights file"):
        FeatureSpace("classifier", None, tmp_path)
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        FeatureSpace("vgg", None, tmp_path)


def test_failed_inception_download_says_what_to_configure(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(ConfigError, match="eval.inception_weights.*weights-inception-2015-12-05-6726825d.pth"):
        FeatureSpace("inception", None, tmp_path)


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
def test_samples_do_not_depend_on_world_size_or_batch(digit_weights, tmp_path, world_size):
    """Image i has its own latents: the features (in sample order) are the same on 1, 2 or 3 ranks and for
    any batch size, and every rank runs the same number of batches."""
    def space(batch, ranks=Ranks()):
        return FeatureSpace("classifier", str(digit_weights), tmp_path, batch_size=batch, ranks=ranks)
    single, images = space(8).sample(tanh_sampler, SHAPE, 20, seed=3, keep_images=True)
    other_batch, other_images = space(5).sample(tanh_sampler, SHAPE, 20, seed=3, keep_images=True)
    assert torch.equal(images, other_images)
    torch.testing.assert_close(other_batch, single)
    calls = [0] * world_size

    def on_rank(rank, gather):
        def sample_fn(latents):
            calls[rank] += 1
            return tanh_sampler(latents)
        return space(8, Ranks(rank, world_size, gather)).sample(sample_fn, SHAPE, 20, seed=3)[0]

    assert all(torch.equal(f, single) for f in run_ranks(world_size, on_rank))
    assert len(set(calls)) == 1, f"ranks ran different numbers of batches: {calls}"
    assert not torch.equal(space(8).sample(tanh_sampler, SHAPE, 20, seed=4)[0], single)


def test_reference_features_are_cached(digit_weights, tmp_path):
    loads = []

    def load_images():
        loads.append(1)
        return reference_images(24)

    first = FeatureSpace("classifier", str(digit_weights), tmp_path).reference("pop", load_images)
    again = FeatureSpace("classifier", str(digit_weights), tmp_path).reference("pop", load_images)
    assert len(loads) == 1
    assert (tmp_path / "classifier-pop.npz").is_file()
    assert torch.equal(first, again) and first.shape == (24, 64)

    other_weights = tmp_path / "other.safetensors"
    save_classifier(Classifier(1, 16, 10), other_weights, [str(c) for c in range(10)], accuracy=0.0)
    FeatureSpace("classifier", str(other_weights), tmp_path).reference("pop", load_images)
    assert len(loads) == 2, "features made with other extractor weights must be recomputed"


def test_frechet_is_torch_fidelitys_fid(digit_weights, tmp_path):
    """Our distance between two image sets equals torch-fidelity's own calculate_metrics on them."""
    a, b = reference_images(16, seed=1), reference_images(12, seed=2)

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i].expand(3, -1, -1)

    metrics = torch_fidelity.calculate_metrics(
        input1=Images(a), input2=Images(b), fid=True, feature_extractor="classifier",
        feature_extractor_weights_path=str(digit_weights), cuda=False, cache=False, verbose=False, save_cpu_ram=True)
    space = FeatureSpace("classifier", str(digit_weights), tmp_path)
    assert frechet(space.extract(a), space.extract(b)) == pytest.approx(metrics[KEY_METRIC_FID], rel=1e-5)


def test_metric_names():
    assert metric_name("inception", 2000) == "fid2k"
    assert metric_name("inception", 50000) == "fid50k"
    assert metric_name("inception", 64) == "fid64"
    assert metric_name("inception", 2500) == "fid2500"
    assert metric_name("classifier", 2000) == "fd_clf2k"
    with pytest.raises(ConfigError):
        metric_name("clip", 100)
