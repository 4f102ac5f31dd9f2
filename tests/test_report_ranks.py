"""The evaluate stage on several ranks, in-process: one thread per rank, the collectives faked with a barrier.
The report's statistics are the same on 1 and 2 ranks, bit for bit (on the CPU); between two collectives a
rank computes at most one task, which bounds how long any rank waits at a collective; and the per-image values
reach the collective on the accelerator's device even from a rank that has no images."""
import threading

import numpy as np
import torch

from evaluation.features import Ranks, frechet
from evaluation.intervals import bootstrap_round, frechet_interval, kernel_distance
from evaluation.memorisation import memorisation
from evaluation.spec import EvalSpec
from stages.evaluate import Measured, class_tv, gather_by_index, rank_share, report_statistics

SHAPE = (1, 4, 4)


def run_ranks(world: int, fn, log: list | None = None) -> list:
    """fn(Ranks) on `world` threads, one per rank, with all-gathers as accelerate's (tensors concatenated, lists
    of objects flattened, in rank order); each collective is appended to `log` as (rank, "collective")."""
    slots, results = [None] * world, [None] * world
    barrier = threading.Barrier(world, timeout=60)  # a rank that dies fails the test, not hangs it

    def all_gather(rank, value):
        if log is not None:
            log.append((rank, "collective"))
        slots[rank] = value
        barrier.wait()
        everything = list(slots)
        barrier.wait()
        return everything

    def target(rank):
        ranks = Ranks(rank, world, gather=lambda t: torch.cat(all_gather(rank, t)),
                      gather_objects=lambda items: [x for part in all_gather(rank, items) for x in part])
        results[rank] = fn(ranks)

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_between_two_collectives_a_rank_computes_at_most_one_task():
    """The bound of report_statistics: Ranks.map deals the tasks one per rank per collective and computes
    nothing after the last, so a rank waits at a collective at most as long as the slowest single task takes,
    however many tasks there are."""
    log = []

    def on_rank(ranks):
        def square(item):
            log.append((ranks.rank, "task"))
            return item * item
        return ranks.map(square, list(range(7)))

    assert run_ranks(3, on_rank, log) == [[x * x for x in range(7)]] * 3
    for rank in range(3):
        events = "".join("t" if what == "task" else "|" for who, what in log if who == rank)
        assert events.count("|") == 3  # ceil(7 / 3) rounds, the same on every rank
        assert all(len(between) <= 1 for between in events.split("|")) and events.endswith("|"), events
    assert Ranks().map(lambda x: x * x, [1, 2]) == [1, 4]  # one process: no collective


def rows_and_sets():
    """Two models and a floor with its own reference and held-out images: features [N, 6], uint8 images."""
    g = torch.Generator().manual_seed(0)

    def images(count):
        return torch.randint(0, 256, (count, *SHAPE), generator=g, dtype=torch.uint8)

    reference, target = images(30), images(8)
    reference_features = torch.randn(30, 6, generator=g)
    samples = images(40)
    rows = [Measured("aux/a", "a model", samples, torch.randn(40, 6, generator=g) + 0.5,
                     facts={"population": "a"}, copy_sets={"aux": torch.cat([images(20), samples[:10]])}),
            Measured("fused-exact", "another", torch.cat([target[:4], images(36)]), torch.randn(40, 6, generator=g)),
            Measured("real: halves", "a floor", reference[:15], reference_features[:15],
                     reference=reference_features[15:], held_out=reference[15:23])]
    own = {"a": torch.randn(50, 6, generator=g)}
    return rows, reference, reference_features, target, own


def quarters(images: torch.Tensor) -> torch.Tensor:
    """A made-up classifier: the quarter of 0..255 an image's mean pixel falls in, as one-hot rows."""
    return torch.nn.functional.one_hot(images.flatten(1).float().mean(1).long() // 64, 4).double()


def statistics(ranks: Ranks):
    rows, reference, reference_features, target, own = rows_and_sets()
    ev = EvalSpec(bootstrap=9, kid_subsets=4, kid_subset_size=10)
    return report_statistics(rows, reference, reference_features, target, own, ev, 3, ranks, "cpu",
                             classify=quarters,
                             domain=(lambda images: images.flatten(1).float(), reference.flatten(1).float()))


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b, (a, b)


def test_report_statistics_are_the_same_on_one_and_two_ranks():
    one, reference_props, _ = statistics(Ranks())
    for stats, props, _ in run_ranks(2, statistics):
        assert_same(stats, one)
        assert np.array_equal(props, reference_props)
    # ... and they are the functions' own numbers, each row against its own reference and held-out images
    rows, reference, reference_features, target, own = rows_and_sets()
    model, floor = one["aux/a"], one["real: halves"]
    assert model["fd"] == frechet_interval(rows[0].features, reference_features, 9, 3)
    assert floor["fd"] == frechet_interval(rows[2].features, rows[2].reference, 9, 3)
    assert model["kid"] == kernel_distance(rows[0].features, reference_features, 4, 10, 3)
    assert model["own"] == frechet(rows[0].features, own["a"])
    # at the halves floor's sizes: the first 15 of the 40 samples against the floor's own reference
    assert model["matched"] == frechet(rows[0].features[:15], rows[2].reference)
    assert floor["matched"] == floor["fd value"]
    assert one["fused-exact"]["own"] is None
    assert_same(one["fused-exact"]["copies"], memorisation(rows[1].images, target, reference[:8]))
    assert one["fused-exact"]["copies"]["copy_share"] == 0.1  # 4 of its 40 samples are training images
    assert_same(floor["copies"], memorisation(rows[2].images, target, rows[2].held_out))
    # class proportions, and their total variation to the reference's in round r's resample of both sets
    assert np.array_equal(model["classes"], quarters(rows[0].images).mean(0).numpy())
    tv = [bootstrap_round(quarters(rows[0].images), quarters(reference), 3, r, class_tv) for r in range(9)]
    assert model["class tv rounds"] == tv and len(set(tv)) > 1
    assert model["copies of"] == {"aux": 0.25} and one["fused-exact"]["copies of"] == {}  # 10 of 40 are aux images
    assert model["domain"] == frechet(rows[0].images.flatten(1).float(), reference.flatten(1).float())


def test_per_image_values_are_gathered_in_image_order_with_a_rank_that_has_none():
    values = torch.tensor([10.0, 11.0])  # image i's value: 10 + i

    def on_rank(ranks):
        mine = torch.arange(2)[ranks.rank::ranks.world]  # rank 2 has no image
        return gather_by_index(ranks, values[mine], mine, 2, "cpu")

    assert all(torch.equal(got, values.double()) for got in run_ranks(3, on_rank))
    assert torch.equal(gather_by_index(Ranks(), values, torch.arange(2), 2, "cpu"), values.double())


def test_a_rank_without_images_hands_the_collective_a_tensor_on_its_device():
    """NCCL takes only tensors on the rank's GPU: the padding of an empty share is made on the given device."""
    share = rank_share(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long), 3, torch.device("meta"))
    assert share.device == torch.device("meta") and share.shape == (3, 2)
    padded = rank_share(torch.tensor([0.5]), torch.tensor([4]), 2, "cpu")
    assert torch.equal(padded, torch.tensor([[0.5, 4.0], [-1.0, -1.0]], dtype=torch.float64))
