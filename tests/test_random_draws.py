"""The rules of random draws, checked in the source.

Every seed comes from a named stream (shards.seeds: `generator`, `seed_of`), never from arithmetic on a seed:
seed + 1 of one use is seed of another run's, and seed * c + rank collides across ranks and runs.

Every seeded random draw happens on its generator's own device. torch.randn(..., generator=g, device=d)
raises on a GPU when g is a CPU generator and d is CUDA, which a CPU run can never show. A call that passes
`generator=` may pass `device=` only as that generator's own `.device`; the result is then moved where it is
needed (shards.seeds.normal does both)."""
import ast
from pathlib import Path

import torch

from shards.seeds import Stream, normal

ROOT = Path(__file__).parents[1]
DRAWS = {"randn", "rand", "randint", "randperm", "normal", "bernoulli", "multinomial", "randn_like", "rand_like",
         "randint_like", "poisson"}


PACKAGES = ("shards", "trainer", "evaluation", "stages", "launch")


def offenders(check) -> dict[str, list[int]]:
    """The package's files in which `check(source)` finds lines, with those lines."""
    return {str(path.relative_to(ROOT)): lines for package in PACKAGES for path in (ROOT / package).rglob("*.py")
            if (lines := check(path.read_text()))}


def seeds_by_arithmetic(source: str) -> list[int]:
    """Line numbers of arithmetic with a seed (a name or attribute `seed` or `*_seed`) as an operand."""
    def is_seed(node) -> bool:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return name == "seed" or name.endswith("_seed")
    return sorted(node.lineno for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.BinOp) and (is_seed(node.left) or is_seed(node.right)))


def test_no_seed_is_made_by_arithmetic():
    assert not offenders(seeds_by_arithmetic)


def test_the_arithmetic_check_catches_the_patterns_it_replaced():
    bad = "torch.manual_seed(cfg.train.seed * 7919 + rank)\nloader(seed=cfg.train.seed + i)\ng(base_seed + 1)\n"
    good = "torch.manual_seed(seed_of(cfg.train.seed, Stream.LAMBDA_SGD, rank))\nx = (seed_of(seed, s) + i) % 2**32\n"
    assert seeds_by_arithmetic(bad) == [1, 2, 3] and seeds_by_arithmetic(good) == []


def test_every_stream_has_a_value_of_its_own():
    """An IntEnum member with another's value is silently an alias of it: two uses, one seed."""
    assert len(Stream.__members__) == len(set(Stream.__members__.values()))


def draws_with_a_foreign_device(source: str) -> list[int]:
    """Line numbers of draws whose device is not their generator's."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DRAWS):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        if "generator" not in keywords or "device" not in keywords:
            continue
        device, gen = keywords["device"], keywords["generator"]
        own = isinstance(device, ast.Attribute) and device.attr == "device" and ast.dump(device.value) == ast.dump(gen)
        if not own:
            lines.append(node.lineno)
    return lines


def test_every_seeded_draw_in_the_package_uses_its_generators_device():
    assert not offenders(draws_with_a_foreign_device)


def test_the_check_catches_the_pattern_that_fails_on_a_gpu():
    bad = "import torch\ng = torch.Generator()\nx = torch.randn(3, generator=g, device=torch.device('cuda'))\n"
    good = "import torch\ng = torch.Generator()\nx = torch.randn(3, generator=g, device=g.device).to('cuda')\n"
    assert draws_with_a_foreign_device(bad) == [3] and draws_with_a_foreign_device(good) == []


def test_normal_draws_on_the_generator_and_moves_to_the_target():
    """seeds.normal with a CPU generator and a meta target: drawn on the CPU (what the generator can fill),
    then moved; the numbers are the generator's."""
    out = normal((2, 3), torch.Generator().manual_seed(0), torch.device("meta"))
    assert out.device.type == "meta"
    assert torch.equal(normal((2, 3), torch.Generator().manual_seed(0), "cpu"),
                       torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
