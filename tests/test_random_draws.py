"""Every seeded random draw happens on its generator's own device. torch.randn(..., generator=g, device=d)
raises on a GPU when g is a CPU generator and d is CUDA, which a CPU run can never show: so the rule is
checked in the source. A call that passes `generator=` may pass `device=` only as that generator's own
`.device`; the result is then moved where it is needed (shards.seeds.normal does both)."""
import ast
from pathlib import Path

import torch

from shards.seeds import normal

ROOT = Path(__file__).parents[1]
DRAWS = {"randn", "rand", "randint", "randperm", "normal", "bernoulli", "multinomial", "randn_like", "rand_like",
         "randint_like", "poisson"}


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
    offenders = {str(path.relative_to(ROOT)): lines for package in ("trainer", "evaluation", "shards", "launch")
                 for path in (ROOT / package).rglob("*.py")
                 if (lines := draws_with_a_foreign_device(path.read_text()))}
    assert not offenders, offenders


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
