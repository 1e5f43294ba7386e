"""The hybrid density: normalised on S², exact sampling, localizability, fitting, answers.

Flows are untrained networks (their densities are exact whatever the weights) or vMF geolocators, and the
neighbours come from :class:`ExactNeighbours` over a small random database, so every number is checkable.
"""

from __future__ import annotations

import math

import pytest
import torch

from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig
from geoloc.errors import ConfigError, InputError
from geoloc.geolocator import Geolocator
from geoloc.hybrid import ExactNeighbours, HybridGeolocator, HybridParams, fit_hybrid_params
from geoloc.retrieval import weighted_retrieval
from geoloc.sphere import angle, equal_area_grid, latlon_to_xyz

DIM = 8


def untrained(family: str, seed: int = 0) -> Geolocator:
    torch.manual_seed(seed)
    geo = Geolocator.build(
        FamilyConfig(name=family),
        ModelConfig(dim=32, depth=2, expansion=2),
        cond_dim=DIM,
        likelihood_config=LikelihoodConfig(steps=4),
    )
    for m in geo.net.modules():  # zero-initialised output layers would make the field trivial
        if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
            torch.nn.init.normal_(m.weight, std=0.3)
            torch.nn.init.normal_(m.bias, std=0.3)
    return geo


def database(n: int = 200, seed: int = 0) -> ExactNeighbours:
    g = torch.Generator().manual_seed(seed)
    latlon = torch.stack([torch.rand(n, generator=g) * 120 - 60, torch.rand(n, generator=g) * 360 - 180], 1)
    return ExactNeighbours(torch.randn(n, DIM, generator=g), latlon_to_xyz(latlon).float())


def hybrid(family: str = "rfm-s2", **params) -> HybridGeolocator:
    p = {"k": 5, "tau": 0.2, "kappa": 40.0, "lam_a": 0.0, "lam_b": 0.5, **params}
    return HybridGeolocator(untrained(family), database(), HybridParams(**p))


def test_log_prob_integrates_to_one_on_the_sphere():
    h = hybrid()
    # κ = 40 kernels are ~0.16 rad wide; the grid's cells are ~0.03 rad.
    grid, cell = equal_area_grid(64, 128, dtype=torch.float32)
    cond = torch.randn(2, DIM, generator=torch.Generator().manual_seed(1))
    mass = float(h.log_prob(grid, cond[0]).exp().sum()) * cell
    assert abs(mass - 1.0) < 0.01, mass
    # Both components matter in these items: λ is neither 0 nor 1.
    lam = h.flow_weight(cond)
    assert bool(((lam > 0.2) & (lam < 0.8)).all())


def test_exact_samples_follow_the_density_and_localizability_is_its_negative_entropy():
    h = hybrid(
        "vmf", kappa=30.0
    )  # a closed-form flow keeps the quadrature cheap; the mixture is the same code
    cond = torch.randn(1, DIM, generator=torch.Generator().manual_seed(2))
    grid, cell = equal_area_grid(180, 360, dtype=torch.float32)
    lp = h.log_prob(grid, cond[0])
    neg_entropy_bits = float((lp.exp() * lp).sum() * cell) / math.log(2)
    loc = h.localizability(cond, n=20000, generator=torch.Generator().manual_seed(0))
    assert float(loc[0]) == pytest.approx(neg_entropy_bits, abs=0.05)
    # Mass of a cap around the heaviest neighbour: samples vs quadrature.
    nb = h.neighbours(cond)
    centre = nb.xyz[0, 0]
    x = h.sample(cond, 20000, generator=torch.Generator().manual_seed(1))[0]
    cap = 0.3
    frac = float((angle(x, centre.expand_as(x)) < cap).float().mean())
    quad = float((lp.exp() * (angle(grid, centre.expand_as(grid)) < cap)).sum() * cell)
    assert frac == pytest.approx(quad, abs=0.015)


def test_truth_drawn_from_the_hybrid_is_calibrated_under_it():
    from geoloc.calibration import coverage, hdr_levels

    h = hybrid("vmf", kappa=200.0)
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(800, DIM, generator=g)
    truth = h.sample(cond, 1, generator=g)[:, 0]
    _, lp = h.sample_with_log_prob(cond, 200, generator=g)
    levels = hdr_levels(lp, h.log_prob(truth, cond))
    for alpha, got in coverage(levels).items():
        assert abs(got - alpha) < 0.04, (alpha, got)


def test_rfm_flow_samples_are_exact_and_mixed_in_by_lambda():
    h = hybrid(lam_a=8.0, lam_b=0.0)  # λ ≈ 1: nearly every draw is the flow's
    cond = torch.randn(3, DIM, generator=torch.Generator().manual_seed(4))
    x, lp = h.sample_with_log_prob(cond, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 16, 3) and lp.shape == (3, 16)
    assert torch.allclose(x.norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    flow_only = h.flow_log_prob(x, h._cond(cond))
    assert torch.allclose(lp, flow_only, atol=1e-3)  # the kernels add ~e^-8 of the mass
    h0 = hybrid(lam_a=-30.0, lam_b=0.0)  # λ ≈ 0: draws sit on the neighbours' kernels
    x0 = h0.sample(cond, 200, generator=torch.Generator().manual_seed(0))
    nb = h0.neighbours(cond)
    near = (
        angle(x0.unsqueeze(2).expand(-1, -1, 5, -1), nb.xyz.unsqueeze(1).expand(-1, 200, -1, -1))
        .min(-1)
        .values
    )
    assert float(near.quantile(0.99)) < 0.6  # κ = 40: within ~3.5 kernel widths


def test_lambda_zero_answer_is_the_weighted_retrieval_answer():
    h = hybrid(lam_a=-40.0, lam_b=0.0, kappa=1e4, k=8, tau=0.3)
    cond = torch.randn(50, DIM, generator=torch.Generator().manual_seed(5))
    nb = h.neighbours(cond)
    pred = h.predict(cond, n=8, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pred.xyz, weighted_retrieval(nb.xyz, nb.sim, tau=0.3))
    # Other estimators and top-k run on hybrid samples.
    med = h.predict(
        cond[:4],
        estimator="median",
        n=32,
        steps=4,
        top_k=2,
        localizability=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert med.xyz.shape == (4, 3) and med.topk.mass.shape == (4, 2) and med.localizability.shape == (4,)
    best = h.predict(
        cond[:2], estimator="best-of-n", n=8, steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert best.latlon.shape == (2, 2)
    with pytest.raises(ConfigError):
        h.predict(cond, estimator="nope")


def test_fit_recovers_the_parameters_that_generated_the_data():
    # A uniform flow mixed with kernels on the neighbours: draw truths from a known hybrid, then fit.
    flow = Geolocator.build(FamilyConfig(name="uniform"), ModelConfig(), cond_dim=DIM)
    db = database(400, seed=1)
    true = HybridParams(k=8, tau=0.15, kappa=300.0, lam_a=-1.0, lam_b=0.0)
    h = HybridGeolocator(flow, db, true)
    g = torch.Generator().manual_seed(6)
    cond = torch.randn(3000, DIM, generator=g)
    truth = h.sample(cond, 1, generator=g)[:, 0]
    nb = db.search(cond, 16)
    flow_lp = torch.full((3000,), -math.log(4 * math.pi))
    fit = fit_hybrid_params(flow_lp, truth, nb, ks=(4, 8, 16), slope=False)
    p = fit.params
    assert p.k >= 8
    assert p.kappa == pytest.approx(300.0, rel=0.2)
    assert p.tau == pytest.approx(0.15, rel=0.25)
    lam = 1 / (1 + math.exp(-p.lam_a - p.lam_b * float(nb.sim[:, 0].mean())))
    assert lam == pytest.approx(1 / (1 + math.e), abs=0.05)
    assert fit.nll < fit.flow_nll - 0.5
    # A per-kernel κ (slope β) nests the single κ: its fit can only be as good or better.
    sloped = fit_hybrid_params(flow_lp, truth, nb, ks=(p.k,))
    assert sloped.nll <= fit.per_k[p.k]["nll"] + 1e-6


def test_exact_neighbours_exclude_and_pad():
    db = database(10)
    q = db.features[:3] * 2.0
    nb = db.search(q, 2)
    assert nb.index[:, 0].tolist() == [0, 1, 2]  # each item is its own nearest neighbour
    nb = db.search(q, 2, exclude=torch.tensor([0, 1, -1]))
    assert nb.index[0, 0] != 0 and nb.index[1, 0] != 1 and nb.index[2, 0] == 2
    pad = db.search(q, 12)
    assert (
        pad.sim.shape == (3, 12)
        and bool(torch.isinf(pad.sim[:, 10:]).all())
        and (pad.index[:, 10:] == -1).all()
    )
    with pytest.raises(InputError):
        ExactNeighbours(torch.randn(4, DIM), torch.randn(3, 3))


def test_hybrid_needs_a_density_on_the_sphere():
    with pytest.raises(ConfigError):
        HybridGeolocator(untrained("flow-r3"), database(), HybridParams())
    with pytest.raises(ConfigError):
        HybridParams(k=0)


def test_answer_flow_share_is_fitted_by_geoscore_and_zero_gives_the_neighbours_answer():
    """Truths sit on each item's top neighbour while the flow (λ ≈ 0.9) is an untrained network: the answer
    should listen to the neighbours (small share), and share 0 answers exactly as weighted retrieval does."""
    from geoloc.hybrid import fit_answer_flow

    h = hybrid(lam_a=2.2, lam_b=0.0, kappa=1e4, k=8, tau=0.3)
    cond = torch.randn(120, DIM, generator=torch.Generator().manual_seed(7))
    nb = h.neighbours(cond)
    truth = nb.xyz[:, 0]
    draws = h.flow.sample(cond, 16, steps=4, generator=torch.Generator().manual_seed(1))
    fit = fit_answer_flow(h, cond, truth, nb, draws)
    by_scale = {r["answer_flow"]: r["geoscore"] for r in fit["grid"] if r["answer_poe"] == 0}
    assert set(by_scale) == {0.0, 0.1, 0.25, 0.5, 0.75, 1.0}
    assert fit["answer_flow"] < 1.0 and fit["min_z"] == max(r["min_z"] for r in fit["grid"])
    assert by_scale[0.0] > by_scale[1.0] + 500 and fit["geoscore"] >= by_scale[0.0]
    zero = h.geoscore_answer(cond, neighbours=nb, flow_samples=draws, answer_flow=0.0)
    assert torch.allclose(zero, weighted_retrieval(nb.xyz, nb.sim, tau=0.3), atol=1e-6)
    with pytest.raises(ConfigError):
        HybridParams(answer_flow=1.5)
    assert HybridParams.from_json({**HybridParams(answer_flow=0.25).to_json()}).answer_flow == 0.25


def _band_labeller(latlon):
    """A fake gazetteer: 'countries' are 30°-wide longitude bands, 'regions' 10° bands, 'cities' 1° cells."""
    import numpy as np

    lon = np.asarray(latlon)[:, 1] + 180.0
    return {
        "country": (lon // 30).astype(np.int64),
        "region": (lon // 10).astype(np.int64),
        "city": (np.floor(np.asarray(latlon)[:, 0]) * 1000 + lon // 1).astype(np.int64),
    }


def test_label_aware_answer_is_fitted_on_validation_and_needs_a_labeller():
    """With a labeller the fit scans the label weight too and keeps the setting whose weakest column
    (GeoScore, country, region, city) beats the retrieval answer by the most paired standard errors on
    validation; the answer at label weight 0 is the GeoScore answer; a hybrid whose params weigh labels
    refuses to answer without a labeller."""
    from geoloc.hybrid import ANSWER_LABEL_WEIGHTS, fit_answer_flow
    from geoloc.retrieval import best_expected_answer

    h = hybrid(lam_a=-1.0, lam_b=0.0, kappa=1e4, k=8, tau=0.3)
    cond = torch.randn(150, DIM, generator=torch.Generator().manual_seed(3))
    nb = h.neighbours(cond)
    truth = nb.xyz[:, 1]  # the truth is a neighbour, not always the most central one
    draws = h.flow.sample(cond, 8, steps=4, generator=torch.Generator().manual_seed(1))
    plain = fit_answer_flow(h, cond, truth, nb, draws)
    assert {r["answer_labels"] for r in plain["grid"]} == {0.0}
    h.labeller = _band_labeller
    fit = fit_answer_flow(h, cond, truth, nb, draws)
    assert {r["answer_labels"] for r in fit["grid"]} == set(ANSWER_LABEL_WEIGHTS)
    # The retrieval answer (no share, no vote, no labels) is the baseline with every z at 0; the chosen
    # setting has the best weakest column, so it never loses a column to the baseline (min z >= 0).
    base = next(
        r for r in fit["grid"] if (r["answer_flow"], r["answer_poe"], r["answer_labels"]) == (0, 0, 0)
    )
    assert set(base["z"]) == {"geoscore", "country", "region", "city"} and set(base["z"].values()) == {0.0}
    assert fit["min_z"] == max(r["min_z"] for r in fit["grid"]) and fit["min_z"] >= 0.0
    # Its accuracies are those of its answers, labelled afresh.
    for r in (fit, base):
        kw = {k: r[k] for k in ("answer_flow", "answer_poe", "answer_labels")}
        ans = h.geoscore_answer(cond, neighbours=nb, flow_samples=draws, **kw)
        got, want = h.point_labels(ans.unsqueeze(1)), h.point_labels(truth.unsqueeze(1))
        for lv, acc in r["accuracy"].items():
            hit = (got[lv] == want[lv]) & (want[lv] >= 0)  # -1 and below: unlabelled, never a hit
            assert acc == pytest.approx(float(hit.float().mean())), lv
    for r in fit["grid"]:
        assert r["min_z"] == min(r["z"].values())
        assert r["score"] == pytest.approx(r["geoscore"] / 5000 + sum(r["accuracy"].values()))
        if r["min_z"] > 0:  # better than retrieval on every column
            assert r["geoscore"] > base["geoscore"]
            assert all(r["accuracy"][lv] > base["accuracy"][lv] for lv in ("country", "region", "city"))
    at0 = h.geoscore_answer(cond, neighbours=nb, flow_samples=draws, answer_flow=0.5, answer_labels=0.0)
    h.labeller = None
    assert torch.allclose(at0, h.geoscore_answer(cond, neighbours=nb, flow_samples=draws, answer_flow=0.5))
    h.labeller = _band_labeller
    # The label-aware answer is the best expected score over the mixture's candidates.
    got = h.geoscore_answer(cond, neighbours=nb, flow_samples=draws, answer_flow=1.0, answer_labels=1.0)
    from geoloc.hybrid import flow_log_weight
    from geoloc.retrieval import neighbour_log_weights

    log_lam, log_rest = flow_log_weight(nb.sim, h.params)
    sub = nb.head(8)
    pts = torch.cat([draws.float(), sub.xyz], 1)
    log_w = torch.cat(
        [
            (log_lam - math.log(8)).unsqueeze(1).expand(-1, 8),
            log_rest.unsqueeze(1) + neighbour_log_weights(sub.sim, 0.3),
        ],
        1,
    )
    want = best_expected_answer(pts, log_w, h.point_labels(pts), 1.0)
    assert torch.allclose(got, want)
    # Distances and labels computed once for every candidate (as the fit does) give the same answers as
    # computed per call (up to float ties: the sums run in another order).
    from geoloc.retrieval import pairwise_scores

    cands = h.answer_candidates(nb, draws)
    once = pairwise_scores(cands, h.point_labels(cands))
    for share, vote in ((0.0, 0.0), (0.0, 1.0), (0.5, 0.0)):
        kw = {"neighbours": nb, "flow_samples": draws, "answer_flow": share, "answer_poe": vote}
        want = h.geoscore_answer(cond, answer_labels=0.25, **kw)
        fast = h.geoscore_answer(cond, answer_labels=0.25, pairwise=once, **kw)
        assert float((fast == want).all(1).float().mean()) > 0.97, (share, vote)
    h2 = HybridGeolocator(h.flow, h.index, HybridParams(**{**h.params.to_json(), "answer_labels": 0.5}))
    with pytest.raises(ConfigError, match="labeller"):
        h2.geoscore_answer(cond[:2], flow_samples=draws[:2])


def test_overconfident_hybrid_regions_are_recalibrated_on_validation():
    """Truths come from a hybrid with 4x broader kernels than the model's: the model's 90% region covers far
    less than 90%. A level map fitted on validation items makes its regions cover their nominal share on new
    items (within binomial noise), by drawing a larger raw region (region_level(0.9) > 0.9)."""
    from geoloc.calibration import coverage, fit_level_map, hdr_levels

    model = hybrid("vmf", kappa=400.0, lam_a=-3.0, lam_b=0.0)
    broad = HybridGeolocator(
        model.flow, model.index, HybridParams(**{**model.params.to_json(), "kappa": 100.0})
    )
    g = torch.Generator().manual_seed(5)

    def levels(n: int):
        cond = torch.randn(n, DIM, generator=g)
        truth = broad.sample(cond, 1, generator=g)[:, 0]
        _, lp = model.sample_with_log_prob(cond, 100, generator=g)
        return hdr_levels(lp, model.log_prob(truth, cond))

    val, test = levels(500), levels(500)
    assert coverage(test)[0.9] < 0.75  # overconfident before recalibration
    model.level_map = fit_level_map(val)
    assert model.region_level(0.9) > 0.95 and model.region_level(0.5) > 0.5
    for alpha, got in coverage(model.calibrate_levels(test)).items():
        assert abs(got - alpha) < 0.06, (alpha, got)
    model.level_map = None
    assert model.region_level(0.9) == 0.9


def test_an_answer_without_flow_share_draws_nothing_from_the_flow():
    """answer_flow = 0 weighs the flow's draws by zero: the answer is the neighbours' own, and no flow
    sampling is paid for (it would cost n draws of the ODE per item)."""
    h = hybrid(lam_a=0.5, lam_b=0.0, kappa=1e4, k=8, tau=0.3)
    cond = torch.randn(20, DIM, generator=torch.Generator().manual_seed(5))
    nb = h.neighbours(cond)
    draws = h.flow.sample(cond, 8, steps=4, generator=torch.Generator().manual_seed(1))
    want = h.geoscore_answer(cond, neighbours=nb, flow_samples=draws, answer_flow=0.0)
    calls = []
    real = h.flow.sample
    h.flow.sample = lambda *a, **k: calls.append(1) or real(*a, **k)
    got = h.geoscore_answer(cond, neighbours=nb, answer_flow=0.0)
    assert calls == [] and torch.equal(got, want)
    assert torch.allclose(got, weighted_retrieval(nb.xyz, nb.sim, tau=0.3), atol=1e-6)
    h.geoscore_answer(cond[:2], neighbours=nb.rows(slice(0, 2)), answer_flow=0.5, steps=2)
    assert calls == [1]
    # A fitted draw count overrides the caller's n (predict asks for 256 samples for its top-k).
    sizes = []
    h.flow.sample = lambda c, n, **k: sizes.append(n) or real(c, n, **k)
    h.params = HybridParams(**{**h.params.to_json(), "answer_draws": 3})
    h.geoscore_answer(cond[:2], 256, neighbours=nb.rows(slice(0, 2)), answer_flow=0.5, steps=2)
    assert sizes == [3]


def test_map_binding_holds_the_flow_part_on_coarse_cells_and_keeps_the_mass():
    """For maps, a bound hybrid may evaluate its flow part once per H3 cell of a coarser resolution: the
    value at each point is then the flow's exact log-density at its cell's centre (one solve per item and
    cell, remembered), the kernels stay exact, and a map still integrates to 1 within 1 %."""
    import h3

    from geoloc.config import DensityConfig
    from geoloc.density import density_maps
    from geoloc.hybrid import mixture_log_prob
    from geoloc.hybrid_bound import BoundHybrid
    from geoloc.sphere import xyz_to_latlon

    h = hybrid(lam_a=0.0, lam_b=0.0, kappa=300.0, k=8, tau=0.3)
    cond = torch.randn(2, DIM, generator=torch.Generator().manual_seed(4))
    lik = LikelihoodConfig(steps=4)
    coarse = BoundHybrid(h, cond, flow_resolution=2)
    x = torch.nn.functional.normalize(torch.randn(40, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    rows = cond[torch.arange(40) % 2]
    got = coarse.log_prob(x, rows, lik)
    ll = xyz_to_latlon(x.double()).numpy()
    cells = [h3.latlng_to_cell(float(a), float(o), 2) for a, o in ll]
    centres = latlon_to_xyz(torch.tensor([h3.cell_to_latlng(c) for c in cells], dtype=torch.float64)).float()
    flow_at_centres = h.flow.log_prob(centres, rows, lik)
    nb = coarse.nb.rows(torch.arange(40) % 2)
    want = mixture_log_prob(flow_at_centres.unsqueeze(1), x.unsqueeze(1), nb, h.params)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    solves = len({(i % 2, c) for i, c in enumerate(cells)})
    assert len(coarse._flow_cells) == solves
    again = coarse.log_prob(x, rows, lik)  # every cell is remembered: no new solve
    assert torch.equal(again, got) and len(coarse._flow_cells) == solves
    cfg = DensityConfig(start_resolution=0, levels=3, likelihood=LikelihoodConfig(steps=8), seed_samples=0)
    exact = density_maps(BoundHybrid(h, cond), cond, cfg)
    maps = density_maps(BoundHybrid(h, cond, flow_resolution=1), cond, cfg)
    for a, b in zip(maps, exact, strict=True):
        assert abs(a.total_mass - 1.0) < 0.01 and abs(a.total_mass - b.total_mass) < 0.005
    with pytest.raises(InputError):
        BoundHybrid(h, cond, flow_resolution=16)


def test_flow_support_counts_the_draws_near_each_point():
    """f = mean over draws of exp(−d / 300 km): 1 on top of every draw, exp(−1) at 300 km, ~0 far away."""
    from geoloc.hybrid import POE_KERNEL_KM, flow_support
    from geoloc.sphere import EARTH_RADIUS_KM

    here = latlon_to_xyz(torch.tensor([[10.0, 20.0]])).float()
    away = latlon_to_xyz(torch.tensor([[10.0 + math.degrees(POE_KERNEL_KM / EARTH_RADIUS_KM), 20.0]])).float()
    far = latlon_to_xyz(torch.tensor([[-40.0, -100.0]])).float()
    draws = torch.cat([here, here, here, far]).unsqueeze(0)  # 3 of 4 draws on `here`, one far away
    f = flow_support(torch.cat([here, away, far]).unsqueeze(0), draws)[0]
    assert f[0] == pytest.approx(0.75, abs=1e-4)
    assert f[1] == pytest.approx(0.75 * math.exp(-1.0), abs=2e-3)
    assert f[2] == pytest.approx(0.25, abs=1e-4)


def test_the_flow_votes_on_the_neighbours_and_the_fit_keeps_the_vote_when_it_helps():
    """Each item's truth is its *least* similar neighbour, and the flow's draws sit on it: the retrieval
    answer (no vote) misses it, a vote of β ≥ 1 moves the answer there, the fit chooses a vote (or share)
    that beats retrieval on GeoScore, and the candidates stay the neighbours when the flow has no share."""
    h = hybrid(lam_a=-2.0, lam_b=0.0, kappa=1e4, k=8, tau=0.3)
    from geoloc.hybrid import fit_answer_flow

    cond = torch.randn(150, DIM, generator=torch.Generator().manual_seed(11))
    nb = h.neighbours(cond)
    truth = nb.xyz[:, 7]
    draws = truth.unsqueeze(1).expand(-1, 16, -1).contiguous()
    plain = h.geoscore_answer(cond, neighbours=nb, flow_samples=draws, answer_flow=0.0, answer_poe=0.0)
    assert torch.allclose(plain, weighted_retrieval(nb.xyz, nb.sim, tau=0.3), atol=1e-6)
    voted = h.geoscore_answer(cond, neighbours=nb, flow_samples=draws, answer_flow=0.0, answer_poe=2.0)
    hit_plain = float((angle(plain, truth) < 1e-4).float().mean())
    hit_voted = float((angle(voted, truth) < 1e-4).float().mean())
    assert hit_plain < 0.5 < 0.9 < hit_voted, (hit_plain, hit_voted)
    # Every answer is one of the neighbours (the draws are no candidates at share 0).
    d = angle(voted.unsqueeze(1).expand_as(nb.xyz[:, :8]), nb.xyz[:, :8]).min(1).values
    assert float(d.max()) < 1e-4
    fit = fit_answer_flow(h, cond, truth, nb, draws)
    base = next(r for r in fit["grid"] if (r["answer_flow"], r["answer_poe"]) == (0.0, 0.0))
    assert fit["min_z"] > 0 and fit["geoscore"] > base["geoscore"] + 500
    assert fit["answer_poe"] > 0 or fit["answer_flow"] > 0
    assert all(r["geoscore"] > base["geoscore"] for r in fit["grid"] if r["answer_poe"] >= 1.0)
    with pytest.raises(ConfigError):
        HybridParams(answer_poe=-1.0)
    assert HybridParams.from_json(HybridParams(answer_poe=0.5).to_json()).answer_poe == 0.5
