"""The path objects: endpoints, targets as derivatives of the path, and VP's ε → velocity conversion."""

from __future__ import annotations

import pytest
import torch

from geoloc.config import FamilyConfig, ModelConfig, SampleConfig
from geoloc.errors import ConfigError
from geoloc.families import make_family
from geoloc.paths import GeodesicPath, LinearPath, VPPath
from geoloc.sphere import Euclidean, Sphere, project

PATHS = [GeodesicPath(), LinearPath(), VPPath()]


def _endpoints(path, m: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = path.prior_sample(m, g, "cpu", torch.float64)
    x1 = project(torch.randn(m, 3, generator=g, dtype=torch.float64))
    return x0, x1


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_interpolation_endpoints(path):
    x0, x1 = _endpoints(path)
    m = x0.shape[0]
    at0 = path.interpolate(x0, x1, torch.zeros(m, dtype=torch.float64)).x
    at1 = path.interpolate(x0, x1, torch.ones(m, dtype=torch.float64)).x
    torch.testing.assert_close(at0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(at1, x1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", [GeodesicPath(), LinearPath()], ids=lambda p: p.name)
def test_velocity_target_is_the_derivative_of_the_path(path):
    x0, x1 = _endpoints(path, seed=1)
    s = torch.linspace(0.05, 0.95, x0.shape[0], dtype=torch.float64)
    h = 1e-6
    fd = (path.interpolate(x0, x1, s + h).x - path.interpolate(x0, x1, s - h).x) / (2 * h)
    target = path.interpolate(x0, x1, s).target
    torch.testing.assert_close(target, fd, rtol=1e-6, atol=1e-7)
    # and a velocity network output is already a velocity (on S²: tangent, unchanged)
    xs = path.interpolate(x0, x1, s).x
    torch.testing.assert_close(path.to_velocity(target, xs, s), target, rtol=0, atol=1e-12)


def test_vp_epsilon_to_velocity_matches_autograd_of_the_interpolant():
    path = VPPath()
    x0, x1 = _endpoints(path, seed=2)
    s = torch.linspace(0.02, 0.98, x0.shape[0], dtype=torch.float64).requires_grad_(True)
    ps = path.interpolate(x0, x1, s)
    # dx_s/ds, one coordinate at a time (each row depends only on its own s, so a sum's gradient is per row)
    rows = [torch.autograd.grad(ps.x[:, k].sum(), s, retain_graph=True)[0] for k in range(3)]
    dxds = torch.stack(rows, dim=-1)
    # the exact ε (the target) turned into a velocity is that derivative
    vel = path.to_velocity(ps.target, ps.x.detach(), s.detach())
    torch.testing.assert_close(vel, dxds, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ps.target, x0, rtol=0, atol=0)


def test_spaces_and_priors():
    assert isinstance(GeodesicPath().space, Sphere) and GeodesicPath().on_sphere
    assert isinstance(LinearPath().space, Euclidean) and isinstance(VPPath().space, Euclidean)
    g = torch.Generator().manual_seed(3)
    u = GeodesicPath().prior_sample(1000, g, "cpu", torch.float64)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(1000, dtype=torch.float64))
    assert abs(float(u.mean(0).norm())) < 0.1
    lp = GeodesicPath().prior_log_prob(u)
    torch.testing.assert_close(lp, torch.full_like(lp, -torch.log(torch.tensor(4 * torch.pi)).item()))
    # the Gaussian prior's density at 0 is (2π)^(-3/2)
    z = torch.zeros(1, 3, dtype=torch.float64)
    expected = -1.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    torch.testing.assert_close(LinearPath().prior_log_prob(z)[0], expected)


@pytest.mark.parametrize("name", ["rfm-s2", "flow-r3"])
def test_ddim_is_for_diffusion_only(name):
    fam = make_family(FamilyConfig(name=name))
    net = fam.build_network(ModelConfig(dim=16, depth=1, expansion=2), 4)
    with pytest.raises(ConfigError, match="ddim"):
        fam.sample(net, torch.zeros(1, 4), 2, SampleConfig(steps=2, method="ddim"))


def test_vp_rejects_flow_solvers():
    fam = make_family(FamilyConfig(name="diffusion-r3"))
    net = fam.build_network(ModelConfig(dim=16, depth=1, expansion=2), 4)
    with pytest.raises(ConfigError, match="ddim"):
        fam.sample(net, torch.zeros(1, 4), 2, SampleConfig(steps=2, method="heun"))


def test_families_hold_paths_and_keep_their_target_names():
    kinds = {"rfm-s2": (GeodesicPath, "velocity"), "flow-r3": (LinearPath, "velocity")}
    kinds["diffusion-r3"] = (VPPath, "epsilon")
    for name, (cls, target) in kinds.items():
        fam = make_family(FamilyConfig(name=name))
        assert isinstance(fam.path, cls) and fam.target == target
        assert fam.nll_space() == ("sphere" if cls is GeodesicPath else "r3")
