"""Memorisation: exact nearest neighbours, the copy test of docs/METHODS.md §1c, and the figure of the copies."""
import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.memorisation import PADDING, copies_figure, memorisation, nearest_neighbours
from shards.pixels import to_uint8, to_unit


def random_images(n: int, seed: int, shape=(3, 4, 4)) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def flat(*values: int) -> torch.Tensor:
    """Constant grey images [len(values), 1, 4, 4]: image i is 16 pixels of values[i], so distances are 4 x gaps."""
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()


def test_chunked_search_equals_brute_force():
    samples, images = random_images(37, seed=0), random_images(23, seed=1)
    squared = (samples[:, None].double() - images[None].double()).square().flatten(2).sum(2)  # [37, 23]
    ordered, order = squared.sort(dim=1)
    first, second, index = nearest_neighbours(samples, images, chunk=5)
    assert torch.equal(first, ordered[:, 0].sqrt())
    assert torch.equal(second, ordered[:, 1].sqrt())
    assert torch.equal(index, order[:, 0])


def test_a_copy_counts_and_a_halfway_sample_does_not():
    train = flat(0, 200, 255)
    result = memorisation(flat(200, 100), train, held_out_images=flat(50, 150))
    assert result["nearest"][0] == 1 and result["ratio"][0] == 0  # the copy of image 1, at distance exactly 0
    assert result["ratio"][1] == 1  # as far from 0 as from 200
    assert result["copy_share"] == 0.5


def test_copy_share_is_exact_on_a_constructed_set():
    """Nearest / second nearest: copies 0, 0, 0; 10 -> 10/70; 30 -> 30/50; 40 -> 1; 120 -> 1. Four of seven."""
    result = memorisation(flat(0, 80, 160, 10, 30, 40, 120), flat(0, 80, 160, 240), held_out_images=flat(5, 250))
    assert result["copy_share"] == 4 / 7
    assert torch.allclose(result["ratio"], torch.tensor([0, 0, 0, 1 / 7, 3 / 5, 1, 1], dtype=torch.float64))
    assert result["nearest"][:4].tolist() == [0, 1, 2, 0]


def test_an_exact_copy_of_a_duplicated_training_image_counts():
    result = memorisation(flat(80), flat(0, 80, 80), held_out_images=flat(5, 250))
    assert result["copy_share"] == 1.0


def test_mean_distances_match_a_direct_computation():
    samples, train, held_out = random_images(20, 0), random_images(15, 1), random_images(15, 2)
    result = memorisation(samples, train, held_out)
    direct = lambda images: torch.cdist(samples.flatten(1).double(), images.flatten(1).double()).min(1).values.mean()
    assert result["train_distance"] == pytest.approx(float(direct(train)), rel=1e-9)
    assert result["held_out_distance"] == pytest.approx(float(direct(held_out)), rel=1e-9)


def test_a_copying_model_is_closer_to_its_training_set():
    """Samples = training images plus a little noise in [-1, 1], then pixels as a sampler's are."""
    train, held_out = random_images(30, 0, (1, 16, 16)), random_images(30, 1, (1, 16, 16))
    noise = 0.02 * torch.randn(train.shape, generator=torch.Generator().manual_seed(2))
    copies = to_uint8(to_unit(train) + noise)
    result = memorisation(copies, train, held_out)
    assert result["copy_share"] == 1.0
    assert torch.equal(result["nearest"], torch.arange(30))
    assert result["train_distance"] < result["held_out_distance"] / 10
    fresh = memorisation(random_images(30, 3, (1, 16, 16)), train, held_out)
    assert fresh["copy_share"] == 0.0
    assert fresh["train_distance"] == pytest.approx(fresh["held_out_distance"], rel=0.1)


def test_memorisation_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        memorisation(flat(0), flat(0), held_out_images=flat(5, 250))
    with pytest.raises(ValueError, match="uint8"):
        memorisation(to_unit(flat(0)), flat(0, 255), held_out_images=flat(5, 250))
    with pytest.raises(ValueError, match="shape"):
        nearest_neighbours(random_images(2, 0, (1, 4, 4)), random_images(2, 1, (1, 5, 5)))


def test_copies_figure_is_a_png_of_the_expected_size(tmp_path):
    train = random_images(10, 0, (1, 16, 16))
    samples = torch.cat([train[[7, 2]], random_images(4, 1, (1, 16, 16))])
    result = memorisation(samples, train, random_images(10, 2, (1, 16, 16)))
    path = tmp_path / "copies.png"
    copies_figure(samples, train, result, path, count=3, scale=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as picture:
        assert picture.size == ((3 * (16 + PADDING) + PADDING) * 4, (2 * (16 + PADDING) + PADDING) * 4)
        pixels = torch.from_numpy(np.array(picture.convert("L")))
    # The top-left cell (after padding, scaled 4x) is a copy, and its neighbour below is the same image.
    top = pixels[PADDING * 4:(PADDING + 16) * 4:4, PADDING * 4:(PADDING + 16) * 4:4]
    bottom = pixels[(2 * PADDING + 16) * 4:(2 * PADDING + 32) * 4:4, PADDING * 4:(PADDING + 16) * 4:4]
    assert torch.equal(top, bottom) and (torch.equal(top, train[7, 0]) or torch.equal(top, train[2, 0]))
