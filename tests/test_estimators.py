"""Point estimates and top-k modes on samples with a known answer.

The samples come from von Mises–Fisher distributions drawn with the exact inverse-CDF sampler for S²
(w = 1 + log(u + (1 − u)e^(−2κ))/κ along μ, a uniform direction around it), so where the truth sits and how
much mass it has is known in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch

from geoloc.errors import ConfigError, InputError
from geoloc.estimators import (
    ESTIMATORS,
    MAX_BANDWIDTH_KM,
    basin_of,
    best_by_likelihood,
    density_mode,
    expected_geoscore,
    geodesic_median,
    kde_bandwidth_km,
    kde_log_density,
    max_expected_geoscore,
    mean_shift,
    point_mean_direction,
    top_k_modes,
)
from geoloc.sphere import EARTH_RADIUS_KM, equal_area_grid, haversine_km, latlon_to_xyz, xyz_to_latlon

PARIS = (48.8566, 2.3522)
SYDNEY = (-33.8688, 151.2093)


def vmf_samples(centre: tuple[float, float], kappa: float, n: int, seed: int) -> torch.Tensor:
    """Exact vMF draws on S² around ``centre`` (lat, lon degrees): float64 ``(n, 3)``."""
    g = torch.Generator().manual_seed(seed)
    mu = latlon_to_xyz(torch.tensor(centre, dtype=torch.float64))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    w = 1.0 + torch.log(u + (1.0 - u) * math.exp(-2.0 * kappa)) / kappa
    helper = torch.tensor(
        [1.0, 0.0, 0.0] if abs(float(mu[2])) > 0.9 else [0.0, 0.0, 1.0], dtype=torch.float64
    )
    e1 = torch.linalg.cross(mu, helper)
    e1 = e1 / e1.norm()
    e2 = torch.linalg.cross(mu, e1)
    phi = 2.0 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    r = torch.sqrt((1.0 - w * w).clamp_min(0.0))
    return w[:, None] * mu + r[:, None] * (torch.cos(phi)[:, None] * e1 + torch.sin(phi)[:, None] * e2)


def mixture(parts: list[tuple[tuple[float, float], float, int]], seed: int = 0) -> torch.Tensor:
    """Shuffled float32 ``(1, n, 3)`` samples from vMF components given as (centre, kappa, count)."""
    x = torch.cat([vmf_samples(c, k, m, seed + 17 * i) for i, (c, k, m) in enumerate(parts)])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
    return x[perm].float()[None]


def km_to(xyz: torch.Tensor, latlon: tuple[float, float]) -> float:
    """Great-circle km from one unit vector to a (lat, lon) point, in float64."""
    return float(haversine_km(xyz_to_latlon(xyz.double()), torch.tensor(latlon, dtype=torch.float64)))


def mean_km(point: torch.Tensor, samples: torch.Tensor) -> float:
    """Mean haversine km from ``point`` (3,) to ``samples`` (n, 3), in float64."""
    return float(haversine_km(xyz_to_latlon(point.double())[None], xyz_to_latlon(samples.double())).mean())


def geoscore(point: torch.Tensor, samples: torch.Tensor) -> float:
    d = haversine_km(xyz_to_latlon(point.double())[None], xyz_to_latlon(samples.double()))
    return float((5000.0 * torch.exp(-d / 1492.7)).mean())


@pytest.fixture(scope="module")
def bimodal() -> torch.Tensor:
    """70% around Paris, 30% around Sydney; κ = 5000 (per-axis spread ≈ 90 km)."""
    return mixture([(PARIS, 5000.0, 700), (SYDNEY, 5000.0, 300)], seed=1)


def test_vmf_sampler_has_the_exact_mean_resultant_length() -> None:
    # E[x·μ] = coth κ − 1/κ for a vMF on S²; this validates the sampler the other tests rely on.
    for centre, kappa in [((10.0, 20.0), 5.0), ((90.0, 0.0), 50.0)]:
        x = vmf_samples(centre, kappa, 40000, seed=3)
        mu = latlon_to_xyz(torch.tensor(centre, dtype=torch.float64))
        expected = 1.0 / math.tanh(kappa) - 1.0 / kappa
        assert float((x @ mu).mean()) == pytest.approx(expected, abs=4e-3)
        assert torch.allclose(x.norm(dim=-1), torch.ones(len(x), dtype=torch.float64))


# ------------------------------------------------------------------------------------------- top-k


def test_top_k_modes_finds_both_modes_and_their_mass(bimodal: torch.Tensor) -> None:
    top = top_k_modes(bimodal, k=5)
    assert top.valid[0].tolist() == [True, True, False, False, False]
    assert km_to(top.xyz[0, 0], PARIS) < 40.0
    assert km_to(top.xyz[0, 1], SYDNEY) < 40.0
    assert float(top.mass[0, 0]) == pytest.approx(0.7, abs=0.05)
    assert float(top.mass[0, 1]) == pytest.approx(0.3, abs=0.05)
    assert float(top.mass[0].sum() + top.other_mass[0]) == pytest.approx(1.0, abs=1e-6)
    # latlon is the degrees view of xyz; padded entries are NaN, never a fake (0°, 0°).
    assert torch.allclose(top.latlon[0, :2], xyz_to_latlon(top.xyz[0, :2]))
    assert torch.isnan(top.xyz[0, 2:]).all() and torch.isnan(top.latlon[0, 2:]).all()
    assert (top.mass[0, 2:] == 0).all()
    # Each sample's basin label agrees with the masses.
    for i in range(2):
        assert float((top.assignment[0] == i).float().mean()) == pytest.approx(float(top.mass[0, i]))
    assert torch.isfinite(top.log_density[0, :2]).all() and (top.log_density[0, 2:] == -math.inf).all()


def test_top_k_modes_keeps_a_broad_secondary_mode_in_one_piece() -> None:
    # A tight cluster (σ ≈ 64 km) beside a continent-wide one (σ ≈ 640 km): one bandwidth per item would
    # cut the broad one into many small modes; the adaptive bandwidths keep it whole.
    x = mixture([((40.0, 10.0), 1e4, 700), ((-20.0, 130.0), 100.0, 300)], seed=5)
    top = top_k_modes(x, k=4)
    assert float(top.mass[0, 0]) == pytest.approx(0.7, abs=0.02)
    assert float(top.mass[0, 1]) == pytest.approx(0.3, abs=0.03)
    assert float(top.mass[0, 2:].sum() + top.other_mass[0]) < 0.03
    assert km_to(top.xyz[0, 1], (-20.0, 130.0)) < 300.0


def test_top_k_modes_merges_modes_closer_than_min_separation() -> None:
    # Two equal clusters ≈ 470 km apart (σ ≈ 64 km): distinct by default, one mode when 1000 km is required.
    x = mixture([((40.0, 10.0), 1e4, 300), ((40.0, 15.5), 1e4, 300)], seed=7)
    apart = top_k_modes(x, k=3)
    assert apart.valid[0].tolist() == [True, True, False]
    assert sorted(apart.mass[0, :2].tolist()) == pytest.approx([0.5, 0.5], abs=0.03)
    merged = top_k_modes(x, k=3, min_separation_km=1000.0)
    assert merged.valid[0].tolist() == [True, False, False]
    assert float(merged.mass[0, 0]) == pytest.approx(1.0)


def test_top_k_modes_reports_small_modes_as_other() -> None:
    x = mixture([((0.0, 0.0), 1e4, 500), ((30.0, 60.0), 1e4, 300), ((-40.0, -70.0), 1e4, 200)], seed=9)
    top = top_k_modes(x, k=2)
    assert top.valid[0].all()
    assert top.mass[0].tolist() == pytest.approx([0.5, 0.3], abs=0.02)
    assert float(top.other_mass[0]) == pytest.approx(0.2, abs=0.02)
    assert float((top.assignment[0] == -1).float().mean()) == pytest.approx(float(top.other_mass[0]))


US, GULF, ATLANTIC = (40.0, -100.0), (30.0, -85.0), (40.0, -40.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_modes_reports_a_distant_ten_percent_mode(seed: int) -> None:
    # 60% / 30% / 10%, broad (σ ≈ 640 / 370 / 640 km); the 10% mode lies 5,000 km from the main one.
    assert float(haversine_km(torch.tensor(US), torch.tensor(ATLANTIC))) == pytest.approx(5000.0, abs=100.0)
    x = mixture([(US, 100.0, 1200), (GULF, 300.0, 600), (ATLANTIC, 100.0, 200)], seed=seed)
    top = top_k_modes(x, k=3)
    assert top.valid[0].all()
    assert float(top.mass[0, 2]) == pytest.approx(0.1, abs=0.03)
    assert km_to(top.xyz[0, 2], ATLANTIC) < 400.0
    # The two near modes (1,760 km apart) overlap: a few % of the US component's tail lies in the Gulf's
    # basin, so basin masses differ from the component weights there; together they hold the rest.
    assert top.mass[0, :2].tolist() == pytest.approx([0.6, 0.3], abs=0.06)
    assert float(top.mass[0, :2].sum()) == pytest.approx(0.9, abs=0.03)
    assert float(top.mass[0].sum() + top.other_mass[0]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_modes_keeps_a_few_far_samples_out_of_the_main_mode(seed: int) -> None:
    # Issue 14's "Springfield": 232 of 256 samples in the US, 14 spread over Europe, 10 in south-east
    # Australia. Before the bandwidth ceiling the sparse groups' k-NN radii spanned oceans and the answer
    # was one mode at 100% ("other" 0). Now no sample 3,000 km from the top mode is counted in it.
    x = mixture(
        [((39.0, -90.0), 60.0, 232), ((50.0, 10.0), 30.0, 14), ((-35.0, 145.0), 100.0, 10)], seed=seed
    )
    top = top_k_modes(x, k=3)
    far = haversine_km(xyz_to_latlon(top.xyz[0, 0].double())[None], xyz_to_latlon(x[0].double())) > 3000.0
    assert int(far.sum()) == 24
    assert not bool((top.assignment[0][far] == 0).any())
    assert float(top.mass[0, 0]) == pytest.approx(232 / 256, abs=0.01)
    assert float(top.mass[0, 1:].sum() + top.other_mass[0]) == pytest.approx(24 / 256, abs=0.01)
    assert km_to(top.xyz[0, 2], (-35.0, 145.0)) < 800.0  # Australia's 10 samples are the third mode
    for i in range(3):
        assert float((top.assignment[0] == i).float().mean()) == pytest.approx(float(top.mass[0, i]))
    assert float((top.assignment[0] == -1).float().mean()) == pytest.approx(float(top.other_mass[0]))


@pytest.mark.parametrize("kappa", [50.0, 1e3, 1e5])
def test_top_k_modes_of_one_vmf_is_one_mode(kappa: float) -> None:
    x = mixture([(US, kappa, 1000)], seed=3)
    top = top_k_modes(x, k=3)
    assert float(top.mass[0, 0]) >= 0.98
    assert float(top.mass[0].sum() + top.other_mass[0]) == pytest.approx(1.0, abs=1e-6)
    assert km_to(top.xyz[0, 0], US) < 0.3 * EARTH_RADIUS_KM / math.sqrt(kappa) + 5.0


@pytest.mark.parametrize("kappa", [200.0, 1e3, 1e4, 1e5])
def test_two_modes_300_km_apart_follow_the_bandwidth_rule(kappa: float) -> None:
    # The rule (top_k_modes docstring): separate iff D ≳ 2·√(σ² + h²) and D > 2h. σ = 450, 201, 64, 20 km:
    # the first two mixtures are unimodal even before smoothing (D < 2σ), the last two clearly bimodal.
    a, b = (40.0, 10.0), (40.0, 13.52)
    d = float(haversine_km(torch.tensor(a), torch.tensor(b)))
    assert d == pytest.approx(300.0, abs=2.0)
    x = mixture([(a, kappa, 500), (b, kappa, 500)], seed=4)
    sigma = EARTH_RADIUS_KM / math.sqrt(kappa)
    h = float(kde_bandwidth_km(x).median())
    separate = d > 2.0 * math.sqrt(sigma**2 + h**2) and d > 2.0 * h
    top = top_k_modes(x, k=3)
    if separate:
        assert top.valid[0].tolist() == [True, True, False]
        assert sorted(top.mass[0, :2].tolist()) == pytest.approx([0.5, 0.5], abs=0.03)
    else:
        assert top.valid[0].tolist() == [True, False, False]
        assert float(top.mass[0, 0]) == pytest.approx(1.0)
    assert separate == (kappa >= 1e4)


def test_bandwidth_ceiling() -> None:
    x = mixture([(US, 1e4, 200), (SYDNEY, 1e4, 5)], seed=6)  # 5 samples: their 16-NN lie 13,000 km away
    h = kde_bandwidth_km(x)
    assert float(h.max()) == pytest.approx(MAX_BANDWIDTH_KM)
    assert float(kde_bandwidth_km(x, max_km=20_000.0).max()) > 10_000.0
    with pytest.raises(ConfigError, match="max_km"):
        kde_bandwidth_km(x, max_km=0.0)


def test_basin_of_places_estimates_in_the_reported_modes(bimodal: torch.Tensor) -> None:
    top = top_k_modes(bimodal, k=1)  # Paris kept, Sydney in "other"
    points = torch.stack(
        [
            max_expected_geoscore(bimodal)[0],
            latlon_to_xyz(torch.tensor([49.5, 3.0])),  # ~100 km from Paris: in its basin
            latlon_to_xyz(torch.tensor([-33.0, 150.0])),  # Sydney's basin: not among the top 1
        ]
    )[None].float()
    assert basin_of(points, bimodal, top)[0].tolist() == [0, 0, -1]
    top2 = top_k_modes(bimodal, k=2)
    assert basin_of(points, bimodal, top2)[0].tolist() == [0, 0, 1]


# ------------------------------------------------------------------------------------ point estimates


def test_density_mode_returns_the_heavier_mode(bimodal: torch.Tensor) -> None:
    assert km_to(density_mode(bimodal)[0], PARIS) < 40.0


def test_density_mode_uses_exact_log_densities_when_given(bimodal: torch.Tensor) -> None:
    # The true mixture density: the 30% Sydney component is not the global maximum.
    def log_prob_fn(xyz: torch.Tensor) -> torch.Tensor:
        kappa = 5000.0
        log_c = math.log(kappa / (2.0 * math.pi))
        comps = []
        for centre, weight in [(PARIS, 0.7), (SYDNEY, 0.3)]:
            mu = latlon_to_xyz(torch.tensor(centre)).to(xyz)
            comps.append(math.log(weight) + log_c + kappa * ((xyz * mu).sum(-1) - 1.0))
        return torch.logsumexp(torch.stack(comps), dim=0)

    lp = log_prob_fn(bimodal)
    assert km_to(density_mode(bimodal, log_prob=lp)[0], PARIS) < 40.0
    assert km_to(density_mode(bimodal, log_prob_fn=log_prob_fn)[0], PARIS) < 40.0


def test_geodesic_median_of_a_tight_cluster_is_its_centre() -> None:
    centre = (35.0, 139.0)
    x = mixture([(centre, 1e5, 500)], seed=11)  # σ ≈ 20 km
    med = geodesic_median(x)[0]
    assert km_to(med, centre) < 3.0
    # It is a minimum of the mean distance: 1 km moves in four directions do not improve it.
    best = mean_km(med, x[0])
    for dlat, dlon in [(0.009, 0.0), (-0.009, 0.0), (0.0, 0.011), (0.0, -0.011)]:
        moved = latlon_to_xyz(xyz_to_latlon(med.double()) + torch.tensor([dlat, dlon], dtype=torch.float64))
        assert mean_km(moved, x[0]) >= best - 1e-3


def test_geodesic_median_beats_the_mean_direction_on_a_skewed_set() -> None:
    x = mixture([((50.0, 10.0), 1e4, 80), ((20.0, 40.0), 1e4, 20)], seed=13)
    med, mean = geodesic_median(x)[0], point_mean_direction(x)[0]
    assert mean_km(med, x[0]) < mean_km(mean, x[0]) - 100.0
    assert km_to(med, (50.0, 10.0)) < 150.0  # the median stays with the majority; the mean is pulled away
    assert km_to(mean, (50.0, 10.0)) > 500.0


def test_geodesic_median_at_a_repeated_sample() -> None:
    # Three copies of one point outweigh two others: the median is exactly that point, where 1/θ is singular.
    p = latlon_to_xyz(torch.tensor([[10.0, 10.0]]))
    others = latlon_to_xyz(torch.tensor([[10.0, 40.0], [-20.0, 10.0]]))
    x = torch.cat([p, p, p, others])[None]
    med = geodesic_median(x)
    assert torch.isfinite(med).all()
    assert km_to(med[0], (10.0, 10.0)) < 0.05
    single = geodesic_median(p[None])
    assert km_to(single[0], (10.0, 10.0)) < 0.05


def test_max_expected_geoscore_is_at_least_every_samples_score(bimodal: torch.Tensor) -> None:
    best = max_expected_geoscore(bimodal)[0]
    scores = [geoscore(s, bimodal[0]) for s in bimodal[0, ::10]]
    assert geoscore(best, bimodal[0]) >= max(scores) - 1e-2
    assert km_to(best, PARIS) < 50.0  # the heavier mode wins
    # expected_geoscore agrees with the float64 haversine formula.
    cand = bimodal[:, :5]
    ours = expected_geoscore(cand, bimodal)[0]
    ref = torch.tensor([geoscore(c, bimodal[0]) for c in cand[0]])
    assert torch.allclose(ours.double(), ref.double(), rtol=1e-4)


def test_max_expected_geoscore_refines_coarse_candidates(bimodal: torch.Tensor) -> None:
    coarse = latlon_to_xyz(torch.tensor([[[45.0, 0.0], [52.0, 8.0], [-30.0, 150.0]]]))
    free = max_expected_geoscore(bimodal)[0]
    from_coarse = max_expected_geoscore(bimodal, candidates=coarse)[0]
    assert geoscore(from_coarse, bimodal[0]) > max(geoscore(c, bimodal[0]) for c in coarse[0]) + 1.0
    assert km_to(from_coarse, PARIS) < 50.0
    assert km_to(from_coarse, xyz_to_latlon(free.double()).tolist()) < 5.0
    unrefined = max_expected_geoscore(bimodal, candidates=coarse, refine_iters=0)
    assert torch.allclose(unrefined[0], coarse[0, 0], atol=1e-6)  # (45°N, 0°E) is the best of the three


def test_max_expected_geoscore_tries_extra_candidates(bimodal: torch.Tensor) -> None:
    # An extra candidate better than every sample (the refined optimum, e.g. from a retrieval neighbour) is
    # taken as it is without refinement; the samples stay candidates too (a bad extra point changes nothing).
    paris = max_expected_geoscore(bimodal)[:, None]
    far = latlon_to_xyz(torch.tensor([[[0.0, -150.0]]]))
    got = max_expected_geoscore(bimodal, extra_candidates=paris, refine_iters=0)[0]
    assert torch.equal(got, paris[0, 0])
    assert geoscore(got, bimodal[0]) > max(geoscore(s, bimodal[0]) for s in bimodal[0, ::5])
    alone = max_expected_geoscore(bimodal, refine_iters=0)
    assert torch.equal(max_expected_geoscore(bimodal, extra_candidates=far, refine_iters=0), alone)
    with pytest.raises(InputError, match="extra_candidates"):
        max_expected_geoscore(bimodal, extra_candidates=paris.expand(2, 1, 3))


def test_expected_geoscore_uses_importance_weights(bimodal: torch.Tensor) -> None:
    # Integer weights equal repeating samples; weights that make Sydney the heavier mode move the optimum.
    cand = bimodal[:, :7]
    w = torch.randint(1, 4, bimodal.shape[:2], generator=torch.Generator().manual_seed(0)).float()
    repeated = bimodal[0].repeat_interleave(w[0].long(), dim=0)[None]
    assert torch.allclose(
        expected_geoscore(cand, bimodal, weights=w), expected_geoscore(cand, repeated), rtol=1e-5
    )
    sydney = xyz_to_latlon(bimodal[0].double())[:, 1] > 100.0
    w = torch.where(sydney, 6.0, 1.0)[None]  # Sydney: 1800 / 2500 = 72% of the weight
    assert km_to(max_expected_geoscore(bimodal, weights=w)[0], SYDNEY) < 50.0
    assert km_to(max_expected_geoscore(bimodal)[0], PARIS) < 50.0
    with pytest.raises(InputError, match="weights"):
        max_expected_geoscore(bimodal, weights=-w)
    with pytest.raises(InputError, match="weights"):
        expected_geoscore(cand, bimodal, weights=w[:, :10])


def test_best_by_likelihood_takes_the_argmax_and_skips_nan() -> None:
    x = mixture([((0.0, 0.0), 100.0, 6)], seed=15).expand(2, -1, -1)
    lp = torch.tensor([[0.0, 5.0, 1.0, float("nan"), 2.0, -1.0], [float("nan")] * 5 + [3.0]])
    out = best_by_likelihood(x, lp)
    assert torch.equal(out[0], x[0, 1]) and torch.equal(out[1], x[1, 5])
    with pytest.raises(InputError, match="log_prob"):
        best_by_likelihood(x, lp[:, :3])


# ------------------------------------------------------------------------------ awkward places, batching


@pytest.mark.parametrize("centre", [(-17.0, 179.95), (90.0, 0.0)], ids=["antimeridian", "north-pole"])
def test_clusters_across_the_antimeridian_and_at_the_pole(centre: tuple[float, float]) -> None:
    x = mixture([(centre, 2e4, 400)], seed=19)  # σ ≈ 45 km, straddling lon ±180 / surrounding the pole
    if centre[0] < 90.0:
        lon = xyz_to_latlon(x[0])[:, 1]
        assert (lon > 179.0).any() and (lon < -179.0).any()
    for name in ("mean", "median", "geoscore"):
        assert km_to(ESTIMATORS[name](x)[0], centre) < 10.0, name
    # A KDE mode from 400 samples is noisier than an average: allow ~0.7 σ.
    assert km_to(ESTIMATORS["mode"](x)[0], centre) < 30.0
    top = top_k_modes(x, k=3)
    assert top.valid[0].tolist() == [True, False, False]
    assert float(top.mass[0, 0]) == pytest.approx(1.0)
    assert km_to(top.xyz[0, 0], centre) < 30.0


def test_batched_results_equal_per_item_results(bimodal: torch.Tensor) -> None:
    items = [
        bimodal[:, :400],
        mixture([((-17.0, 179.95), 2e4, 400)], seed=21),
        mixture([((90.0, 0.0), 2e4, 200), ((60.0, -150.0), 3e3, 200)], seed=23),
    ]
    batch = torch.cat(items)
    for fn in (point_mean_direction, geodesic_median, max_expected_geoscore, density_mode):
        together = fn(batch)
        for i, item in enumerate(items):
            alone = fn(item)[0]
            assert km_to(together[i], xyz_to_latlon(alone.double()).tolist()) < 0.1, fn.__name__
    top = top_k_modes(batch, k=3)
    for i, item in enumerate(items):
        alone = top_k_modes(item, k=3)
        assert torch.equal(top.valid[i], alone.valid[0])
        assert torch.equal(top.mass[i], alone.mass[0])
        assert torch.equal(top.assignment[i], alone.assignment[0])
        v = alone.valid[0]
        assert torch.allclose(top.xyz[i][v], alone.xyz[0][v], atol=2e-5)
    lp = torch.randn(batch.shape[:2], generator=torch.Generator().manual_seed(0))
    assert torch.equal(best_by_likelihood(batch, lp)[1], best_by_likelihood(items[1], lp[1:2])[0])


def test_dtype_and_device_are_preserved(bimodal: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.bfloat16):
        x = bimodal[:, :200].to(dtype)
        for name in ("mean", "median", "geoscore", "mode"):
            out = ESTIMATORS[name](x)
            assert out.dtype == dtype and out.device == x.device and out.shape == (1, 3), name
        top = top_k_modes(x, k=2)
        assert top.xyz.dtype == dtype and top.mass.dtype == dtype and top.valid.dtype == torch.bool
    assert km_to(ESTIMATORS["mode"](bimodal[:, :200].double())[0], PARIS) < 50.0


# ------------------------------------------------------------------------------------------ the KDE


def test_kde_bandwidth_follows_one_cluster_not_the_spread_between_modes() -> None:
    kappa, n = 2000.0, 1000
    sigma_km = EARTH_RADIUS_KM / math.sqrt(kappa)  # per-axis spread of a concentrated vMF
    one = mixture([(PARIS, kappa, n)], seed=25)
    h = kde_bandwidth_km(one)
    assert h.shape == (1, n)
    assert float(h.median()) == pytest.approx(sigma_km * n ** (-1 / 8), rel=0.15)
    assert float(h.min()) == pytest.approx(float(h.median()))  # never narrower than the median
    assert float(h.max()) > 2.0 * float(h.median())  # wider in the tails
    two = mixture([(PARIS, kappa, n // 2), (SYDNEY, kappa, n // 2)], seed=27)
    assert float(kde_bandwidth_km(two).median()) < 1.5 * float(h.median())
    assert float(kde_bandwidth_km(one[:, :1]).item()) == pytest.approx(1.0)  # a single sample: the floor


@pytest.mark.parametrize("bandwidth_km", [None, 400.0], ids=["adaptive", "fixed"])
def test_kde_log_density_integrates_to_one(bandwidth_km: float | None) -> None:
    x = mixture([((20.0, 30.0), 50.0, 60), ((-60.0, -100.0), 200.0, 40)], seed=29)
    grid, cell_area = equal_area_grid(300, 600, dtype=torch.float32)
    log_f = kde_log_density(grid[None], x, bandwidth_km)
    assert float(torch.exp(log_f.double()).sum() * cell_area) == pytest.approx(1.0, abs=2e-3)


def test_kde_is_exact_for_km_scale_bandwidths() -> None:
    # κ ≈ 4·10⁷: the exponent must come from exact chord lengths, not 1 − cos θ in float32.
    x = mixture([((10.0, 10.0), 1e9, 50)], seed=31)
    lp = kde_log_density(x[:, :3], x, 1.0)
    ref = kde_log_density(x[:, :3].double(), x.double(), 1.0)
    assert torch.allclose(lp.double(), ref, atol=1e-3)


def test_mean_shift_climbs_to_the_mode(bimodal: torch.Tensor) -> None:
    start = latlon_to_xyz(torch.tensor([[[47.0, 5.0], [46.0, -1.0], [-30.0, 148.0]]]))
    end, converged = mean_shift(start, bimodal)
    assert converged.all()
    assert (kde_log_density(end, bimodal) >= kde_log_density(start, bimodal)).all()
    assert km_to(end[0, 0], PARIS) < 40.0 and km_to(end[0, 1], PARIS) < 40.0
    assert km_to(end[0, 2], SYDNEY) < 40.0


# ----------------------------------------------------------------------------------- registry, errors


def test_registry_estimators_return_unit_vectors(bimodal: torch.Tensor) -> None:
    assert set(ESTIMATORS) == {"mean", "median", "geoscore", "mode", "best-of-n"}
    x = bimodal[:, :100].expand(2, -1, -1)
    lp = torch.zeros(x.shape[:2])
    for name, est in ESTIMATORS.items():
        out = est(x, lp)
        assert out.shape == (2, 3), name
        assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5), name
    with pytest.raises(ConfigError, match="best-of-n"):
        ESTIMATORS["best-of-n"](x)
    assert ESTIMATORS["best-of-n"].log_prob == "required" and ESTIMATORS["median"].log_prob == "unused"


def test_bad_input_raises_clear_errors(bimodal: torch.Tensor) -> None:
    with pytest.raises(InputError, match=r"\(B, n, 3\)"):
        geodesic_median(torch.zeros(2, 5, 2))
    bad = bimodal[:, :10].expand(3, -1, -1).clone()
    bad[2, 4, 0] = float("nan")
    with pytest.raises(InputError, match="batch index 2"):
        top_k_modes(bad)
    with pytest.raises(ConfigError, match="k must be"):
        top_k_modes(bimodal, k=0)
    with pytest.raises(ConfigError, match="bandwidth_km"):
        kde_log_density(bimodal[:, :2], bimodal, -5.0)


def test_degenerate_sample_sets_give_unit_vectors() -> None:
    # One sample, all-identical samples, a perfectly balanced antipodal pair, and an empty batch.
    one = latlon_to_xyz(torch.tensor([[[12.0, -70.0]]]))
    same = one.expand(2, 6, 3).contiguous()
    poles = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]])
    for x in (one, same, poles):
        for name, est in ESTIMATORS.items():
            out = est(x, torch.zeros(x.shape[:2]))
            assert torch.allclose(out.norm(dim=-1), torch.ones(len(x)), atol=1e-6), name
            if x is not poles:
                assert km_to(out[0], (12.0, -70.0)) < 0.01, name
        top = top_k_modes(x, k=2)
        if x is poles:
            # Changed with issue 14's bandwidth ceiling: this pair used to be one mode at 100% (its kernels
            # were 20,000 km wide), with half the samples at the other pole. Two 50% modes is the honest
            # answer.
            assert top.valid[0].tolist() == [True, True]
            assert top.mass[0].tolist() == pytest.approx([0.5, 0.5])
            assert float(top.other_mass[0]) == pytest.approx(0.0)
            continue
        assert top.valid[:, 0].all() and not top.valid[:, 1].any()
        assert torch.allclose(top.mass[:, 0] + top.other_mass, torch.ones(len(x)))
    empty = torch.zeros(0, 4, 3)
    assert geodesic_median(empty).shape == (0, 3) and density_mode(empty).shape == (0, 3)
    assert top_k_modes(empty, k=3).xyz.shape == (0, 3, 3)
