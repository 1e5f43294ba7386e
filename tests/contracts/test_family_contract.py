"""One suite over every registry entry of FAMILIES: the interface, units, normalisation and input checks.

Untrained networks get their zero-initialised layers re-randomised, so the flow is not the identity and the
normalisation checks are not trivially true.
"""

import math

import pytest
import torch

from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig, SampleConfig
from geoloc.errors import InputError
from geoloc.families import FAMILIES, OdeFamily, make_family
from geoloc.sphere import equal_area_grid

COND_DIM = 4
MODEL = ModelConfig(dim=32, depth=2, expansion=2)
ALL = sorted(FAMILIES)


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    fam = make_family(FamilyConfig(name=name, components=3))
    net = fam.build_network(MODEL, COND_DIM)
    for m in net.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
            torch.nn.init.normal_(m.weight, std=0.3)
            torch.nn.init.normal_(m.bias, std=0.3)
    return fam, net


@pytest.mark.parametrize("name", ALL)
def test_shapes_units_and_reproducible_sampling(name):
    fam, net = build(name)
    cond = torch.randn(3, COND_DIM)
    cfg = SampleConfig(steps=8)
    a = fam.sample(net, cond, 5, cfg, torch.Generator().manual_seed(1))
    b = fam.sample(net, cond, 5, cfg, torch.Generator().manual_seed(1))
    assert a.shape == (3, 5, 3)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3, 5), atol=1e-5)
    assert torch.equal(a, b)
    with torch.no_grad():
        lp = fam.log_prob(net, a.reshape(-1, 3), cond.repeat_interleave(5, 0), LikelihoodConfig(steps=4))
    assert lp.shape == (15,) and torch.isfinite(lp).all()


@pytest.mark.parametrize(
    "name", [n for n in ALL if make_family(FamilyConfig(name=n)).nll_space() == "sphere"]
)
def test_untrained_density_integrates_to_one_on_the_sphere(name):
    fam, net = build(name)
    xyz, area = equal_area_grid(50, 100, torch.float32)
    cond = torch.randn(1, COND_DIM).expand(len(xyz), COND_DIM)
    with torch.no_grad():
        lp = fam.log_prob(net, xyz, cond, LikelihoodConfig(method="rk4", steps=12))
    total = float(lp.double().exp().sum() * area)
    assert total == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if make_family(FamilyConfig(name=n)).nll_space() == "r3"])
def test_untrained_density_integrates_to_one_in_r3(name):
    """Defensive importance sampling: half the draws from the model itself, half from wide Gaussians."""
    fam, net = build(name)
    assert isinstance(fam, OdeFamily)
    g = torch.Generator().manual_seed(0)
    n, cfg = 24000, LikelihoodConfig(method="rk4", steps=12)
    cond1 = torch.randn(1, COND_DIM, generator=g)
    with torch.no_grad():
        own = fam.sample_exact(net, cond1.expand(n // 2, COND_DIM), cfg, g)
    scales = torch.tensor([1.0, 3.0, 10.0, 30.0, 100.0, 300.0])
    wide = torch.randn(n // 2, 3, generator=g) * scales[torch.randint(0, 6, (n // 2,), generator=g)][:, None]
    x = torch.cat([own, wide])
    log_wide = torch.logsumexp(
        torch.stack([-(x**2).sum(-1) / (2 * s**2) - 1.5 * math.log(2 * math.pi * s**2) for s in scales]), 0
    ) - math.log(len(scales))
    with torch.no_grad():
        lp = fam.log_prob(net, x, cond1.expand(n, COND_DIM), cfg)
    log_q = torch.logaddexp(lp, log_wide) - math.log(2)
    assert float((lp - log_q).double().exp().mean()) == pytest.approx(1.0, abs=0.01)


def test_uniform_nll_is_log2_4pi_over_3():
    fam, net = build("uniform")
    xyz = torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    lp = fam.log_prob(net, xyz, torch.randn(10, COND_DIM))
    nll = float(-lp.mean() / (3 * math.log(2)))
    assert nll == pytest.approx(math.log2(4 * math.pi) / 3, abs=1e-6)
    assert nll == pytest.approx(1.2172, abs=1e-4)


@pytest.mark.parametrize("name", [n for n in ALL if n != "uniform"])
def test_loss_falls_on_a_toy_conditional(name):
    fam, net = build(name)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, COND_DIM, generator=g).repeat(128, 1)
    target = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), dim=-1).repeat(128, 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    eval_gen = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    with torch.no_grad():
        before = float(fam.loss(net, target, cond, eval_gen()))
    for step in range(60):
        loss = fam.loss(net, target, cond, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(fam.loss(net, target, cond, eval_gen()))
    assert after < before - 0.1 * abs(before)


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise_clear_errors(name):
    from geoloc.geolocator import Geolocator

    fam, net = build(name)
    geo = Geolocator(
        net, fam, COND_DIM, sample_config=SampleConfig(steps=4), likelihood_config=LikelihoodConfig(steps=2)
    )
    with pytest.raises(InputError, match=r"shape \(N, 4\)"):
        geo.sample(torch.randn(2, 5))
    bad = torch.randn(4, COND_DIM)
    bad[2, 1] = float("nan")
    with pytest.raises(InputError, match="index 2"):
        geo.sample(bad)
    xyz = torch.nn.functional.normalize(torch.randn(3, 3), dim=-1)
    xyz[1] = float("nan")
    with pytest.raises(ValueError, match="index 1"):
        geo.log_prob(xyz, torch.randn(1, COND_DIM))
