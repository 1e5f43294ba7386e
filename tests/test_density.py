"""Adaptive density maps: mass conservation, refinement at the modes, basin masses, drawing.

Sharp synthetic models are vMF geolocators whose output heads are set by hand, so μ, κ (and mixture
weights) are known exactly whatever the condition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig
from geoloc.density import DensityConfig, cell_rings, density_map, density_maps
from geoloc.errors import ConfigError
from geoloc.geolocator import Geolocator
from geoloc.sphere import haversine_km, latlon_to_xyz


def vmf_geolocator(centres, kappas, weights=None) -> Geolocator:
    """A (mixture) vMF geolocator with fixed components, independent of the condition."""
    k = len(centres)
    fam = FamilyConfig(name="vmf" if k == 1 else "vmf-mix", components=k)
    geo = Geolocator.build(fam, ModelConfig(dim=16, depth=1, expansion=2), cond_dim=4)
    net = geo.net
    with torch.no_grad():
        net.mu_head[-1].weight.zero_()
        net.mu_head[-1].bias.copy_(latlon_to_xyz(torch.tensor(centres, dtype=torch.float32)).reshape(-1))
        net.kappa_head[-1].weight.zero_()
        net.kappa_head[-1].bias.copy_(torch.tensor(kappas, dtype=torch.float32))  # softplus(κ) ≈ κ for κ ≫ 1
        if weights is not None:
            net.weight_head[-1].weight.zero_()
            net.weight_head[-1].bias.copy_(torch.tensor(weights, dtype=torch.float32).log())
    return geo


def untrained(family: str, seed: int = 0) -> Geolocator:
    torch.manual_seed(seed)
    geo = Geolocator.build(FamilyConfig(name=family), ModelConfig(dim=32, depth=2, expansion=2), cond_dim=8)
    for m in geo.net.modules():  # the zero-initialised layers would make the field trivial
        if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
            torch.nn.init.normal_(m.weight, std=0.3)
            torch.nn.init.normal_(m.bias, std=0.3)
    return geo


GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("centre", [(48.85, 2.35), (10.0, 179.9), (89.5, 10.0), (-33.9, 151.2)])
@pytest.mark.parametrize("kappa", [50.0, 30000.0])
def test_vmf_mass_is_one_and_cells_concentrate_at_the_mode(centre, kappa):
    geo = vmf_geolocator([centre], [kappa])
    m = density_map(geo, torch.zeros(4), DensityConfig(), generator=torch.Generator().manual_seed(0))
    assert abs(m.total_mass - 1.0) < 0.01
    assert abs(m.area_sr.sum() - 4 * math.pi) < 1e-3  # the leaves cover the sphere once
    peak = m.peaks(1)[0]
    sigma_km = 6371.0 / math.sqrt(kappa)
    assert haversine_km(np.array(centre), np.array([peak["lat"], peak["lon"]])) < max(0.3 * sigma_km, 15.0)
    assert peak["mass"] > 0.98
    # Refinement happened where the mass is, not elsewhere: every fine cell lies on the mode.
    d = haversine_km(np.array(centre)[None], m.latlon)
    fine = m.resolution > m.resolution.min() + 1
    assert fine.any() and d[fine].max() < 6 * sigma_km + 800.0
    if kappa > 1000:
        assert m.resolution.max() >= 6 and m.evaluations < 3000  # vs. 14 million cells at resolution 6
        # The map's own peak density is the vMF's, log(κ/2π), to the resolution of its finest cells.
        assert peak["log_density"] == pytest.approx(math.log(kappa / (2 * math.pi)), abs=0.05)


def test_mixture_basins_carry_the_component_weights():
    geo = vmf_geolocator([(39.8, -89.65), (-25.3, 131.0)], [3000.0, 800.0], weights=[0.7, 0.3])
    m = density_map(geo, torch.zeros(4), generator=torch.Generator().manual_seed(1))
    peaks = m.peaks(3)
    assert len(peaks) == 2 and abs(m.total_mass - 1.0) < 0.01
    assert peaks[0]["mass"] == pytest.approx(0.7, abs=0.02) and peaks[1]["mass"] == pytest.approx(
        0.3, abs=0.02
    )
    assert haversine_km(np.array([peaks[0]["lat"], peaks[0]["lon"]]), np.array([39.8, -89.65])) < 30
    assert haversine_km(np.array([peaks[1]["lat"], peaks[1]["lon"]]), np.array([-25.3, 131.0])) < 60


def test_a_sharp_mode_between_coarse_centres_is_found_through_the_samples():
    """κ = 3·10⁵ (σ ≈ 12 km) from resolution 0 (cells ~1,000 km apart): no coarse centre sees the mode."""
    geo = vmf_geolocator([(10.0, 179.9)], [3e5])
    cfg = DensityConfig(start_resolution=0, levels=6)
    m = density_map(geo, torch.zeros(4), cfg, generator=torch.Generator().manual_seed(0))
    assert abs(m.total_mass - 1.0) < 0.01
    blind = density_map(geo, torch.zeros(4), DensityConfig(start_resolution=0, levels=6, seed_samples=0))
    assert m.total_mass > blind.total_mass  # without samples the map may miss part of it


def test_untrained_rfm_map_integrates_to_one_and_batches_items():
    geo = untrained("rfm-s2")
    cond = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    cfg = DensityConfig(likelihood=LikelihoodConfig(steps=8))
    maps = density_maps(geo, cond, cfg, generator=torch.Generator().manual_seed(0))
    assert len(maps) == 2
    for m in maps:
        assert abs(m.total_mass - 1.0) < 0.02
        assert m.space == "sphere" and m.evaluations >= 842
    one = density_map(geo, cond[1], cfg, seeds=torch.nn.functional.normalize(torch.randn(1, 8, 3), dim=-1))
    assert abs(one.total_mass - 1.0) < 0.02


def test_r3_family_is_restricted_to_the_sphere_and_renormalised():
    geo = untrained("flow-r3")
    cfg = DensityConfig(levels=1, seed_samples=8, likelihood=LikelihoodConfig(steps=4))
    m = density_map(geo, torch.zeros(8), cfg, generator=torch.Generator().manual_seed(0))
    assert m.space == "r3-restricted" and m.total_mass == pytest.approx(1.0, abs=1e-9)
    assert m.log_normaliser != 0.0


def test_config_and_seed_validation():
    with pytest.raises(ConfigError):
        DensityConfig(start_resolution=16)
    with pytest.raises(ConfigError):
        DensityConfig(start_resolution=10, levels=6)
    with pytest.raises(ConfigError):
        DensityConfig(tolerance=-1)
    geo = vmf_geolocator([(0.0, 0.0)], [10.0])
    with pytest.raises(ConfigError, match="seeds"):
        density_map(geo, torch.zeros(4), seeds=torch.zeros(2, 5, 3))


def test_polygons_split_at_the_antimeridian_and_close_at_the_poles():
    import h3

    rings = cell_rings(h3.latlng_to_cell(0.0, 179.95, 2))
    assert len(rings) == 2  # one copy on each side
    for r in rings:
        assert r[:, 0].max() - r[:, 0].min() < 5.0
    pole = cell_rings(h3.latlng_to_cell(90.0, 0.0, 1))
    assert any(np.isclose(r[:, 1], 90.0).any() for r in pole)
    assert min(r[:, 0].min() for r in pole) <= -180.0 and max(r[:, 0].max() for r in pole) >= 180.0
    plain = cell_rings(h3.latlng_to_cell(45.0, 10.0, 3))
    assert len(plain) == 1 and len(plain[0]) == 6


def test_uniform_density_needs_no_refinement():
    geo = Geolocator.build(FamilyConfig(name="uniform"), ModelConfig(), cond_dim=3)
    m = density_map(geo, torch.zeros(3))
    assert m.evaluations == 842 and len(m) == 842 and set(m.resolution.tolist()) == {1}
    assert m.total_mass == pytest.approx(1.0, abs=1e-6)
    assert m.localizability_bits == pytest.approx(-math.log2(4 * math.pi), abs=1e-6)


def test_a_map_off_normalised_is_recomputed_with_more_ode_steps():
    """The midpoint rule with 4 steps is ~9% off on this network; the map doubles steps until it is not."""
    geo = untrained("rfm-s2")
    cond = torch.randn(8, generator=torch.Generator().manual_seed(3))
    lik = LikelihoodConfig(method="midpoint", steps=4)
    raw = density_map(
        geo,
        cond,
        DensityConfig(levels=2, likelihood=lik, mass_tolerance=1.0),
        generator=torch.Generator().manual_seed(0),
    )
    assert raw.mass_error > 0.02 and raw.likelihood_steps == 4
    fixed = density_map(
        geo,
        cond,
        DensityConfig(levels=2, likelihood=lik, max_steps=64),
        generator=torch.Generator().manual_seed(0),
    )
    assert fixed.mass_error < 0.01 and fixed.likelihood_steps >= 8
    assert fixed.evaluations > len(fixed)  # the discarded coarse-step pass is counted too
    vmf = density_map(vmf_geolocator([(0.0, 0.0)], [50.0]), torch.zeros(4))
    assert vmf.likelihood_steps is None  # closed form: no ODE steps to add


def test_highest_density_regions_of_a_vmf_match_the_closed_form():
    """For a vMF, the HDR at level q is a cap of area 2π(1 − cos θ) with 1 − e^{κ(cos θ − 1)} = q."""
    from geoloc.density import highest_density_regions

    kappa = 400.0
    m = density_map(
        vmf_geolocator([(10.0, 20.0)], [kappa]), torch.zeros(4), generator=torch.Generator().manual_seed(0)
    )
    r50, r90 = highest_density_regions(m, (0.5, 0.9))
    for reg, q in ((r50, 0.5), (r90, 0.9)):
        cos_t = 1 + math.log(1 - q) / kappa
        exact = 2 * math.pi * (1 - cos_t) * 6371.0**2
        assert reg.area_km2 == pytest.approx(exact, rel=0.1)
        assert reg.mass >= q and len(reg.outline) == 1
        ring = reg.outline[0][0]
        assert haversine_km(np.array([10.0, 20.0])[None], ring).max() < 1.3 * 6371.0 * math.acos(cos_t)
    with pytest.raises(ConfigError):
        highest_density_regions(m, (1.5,))
