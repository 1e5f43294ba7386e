"""Calibrated regions on distributions whose density is exact: coverage, calibration error, region areas
against closed forms, and quantile recalibration of an overconfident model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geoloc.calibration import (
    calibration_error,
    coverage,
    fit_level_map,
    hdr_levels,
    region_area_km2,
)
from geoloc.errors import InputError
from geoloc.families import vmf_log_density, vmf_sample
from geoloc.sphere import EARTH_RADIUS_KM
from tests.synthetic import VmfMixtureTask


def _mixture_levels(items: int, n: int, seed: int, model_kappa_scale: float = 1.0) -> np.ndarray:
    """HDR levels of truths drawn from a known vMF mixture, under a model that is the same mixture with
    its concentrations scaled (1 = the true density)."""
    g = torch.Generator().manual_seed(seed)
    task = VmfMixtureTask.default(kappa=60.0)
    _, truth, cls_ = task.sample(items, g)
    model = VmfMixtureTask(task.centres, task.kappa * model_kappa_scale, task.log_w, task.class_emb)
    flat_cls = cls_.repeat_interleave(n)
    comp = torch.multinomial(model.log_w.exp()[flat_cls], 1, generator=g).squeeze(-1)
    draws = vmf_sample(model.centres[flat_cls, comp], model.kappa[flat_cls, comp], g)
    lp = model.log_prob(draws, flat_cls).reshape(items, n)
    return hdr_levels(lp, model.log_prob(truth, cls_))


def test_true_density_covers_its_nominal_levels_within_two_points():
    levels = _mixture_levels(6000, 256, seed=0)
    cov = coverage(levels)
    for alpha, got in cov.items():
        assert abs(got - alpha) < 0.02, (alpha, got)
    assert calibration_error(levels) < 0.015


def test_overconfident_model_undercovers_and_recalibration_fixes_it():
    # 1024 samples per item resolve levels up to ~0.999, which the 95% region of a 2× too sharp model needs.
    levels = _mixture_levels(3000, 1024, seed=1, model_kappa_scale=2.0)
    cov = coverage(levels)
    assert cov[0.9] < 0.75  # a 2× too sharp model holds the truth far less often than it claims
    assert calibration_error(levels) > 0.12
    fitted = fit_level_map(levels)
    fresh = _mixture_levels(3000, 1024, seed=2, model_kappa_scale=2.0)
    recal = fitted.calibrated(fresh)
    for alpha, got in coverage(recal).items():
        assert abs(got - alpha) < 0.02, (alpha, got)
    assert calibration_error(recal) < 0.015
    # The region that really holds 90% is a much wider raw level of the sharp model.
    assert fitted.nominal_for(0.9) > 0.98


@pytest.mark.parametrize("kappa", [20.0, 500.0, 2.0e4])
@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_vmf_region_area_matches_its_closed_form(kappa, alpha):
    g = torch.Generator().manual_seed(3)
    n = 20000
    mu = torch.nn.functional.normalize(torch.tensor([[0.3, -0.2, 0.9]], dtype=torch.float64), dim=-1)
    x = vmf_sample(mu.expand(n, 3), torch.full((n,), kappa, dtype=torch.float64), g)
    lp = vmf_log_density(x, mu, torch.tensor(kappa, dtype=torch.float64)).reshape(1, n)
    # The α-region of a vMF is the cap μ·x ≥ w with P(W ≥ w) = α: solid angle −2π·log(1 − α(1 − e^{−2κ}))/κ.
    exact = -2 * math.pi * math.log1p(-alpha * -math.expm1(-2 * kappa)) / kappa * EARTH_RADIUS_KM**2
    got = float(region_area_km2(lp, alpha)[0])
    assert abs(got / exact - 1) < 0.03, (got, exact)


def test_uniform_density_region_is_that_fraction_of_the_earth():
    lp = np.full((2, 1000), -math.log(4 * math.pi))
    lp[1] += np.random.default_rng(0).normal(0, 1e-9, 1000)  # ties broken by noise: same answer
    area = region_area_km2(lp, 0.5)
    earth = 4 * math.pi * EARTH_RADIUS_KM**2
    assert abs(area[1] / earth - 0.5) < 0.01
    assert abs(area[0] / earth - 1.0) < 1e-9  # all tied at the edge: the whole sphere is "as dense"


@pytest.mark.parametrize("n", [4, 16, 32])
def test_levels_of_a_calibrated_model_are_uniform_at_any_draw_count(n):
    # The truth is one more draw of the model: its rank among the n + 1 is uniform. The plain share of denser
    # draws, k/n, would cover α = 0.5 with probability (⌊n/2⌋ + 1)/(n + 1) — 60 % at n = 4, 53 % at n = 16.
    rng = np.random.default_rng(7)
    draws = rng.normal(size=(20000, n + 1))
    levels = hdr_levels(draws[:, :n], draws[:, n], rng=np.random.default_rng(8))
    for alpha, got in coverage(levels, (0.05, 0.25, 0.5, 0.9, 0.95)).items():
        assert abs(got - alpha) < 0.012, (n, alpha, got)
    assert calibration_error(levels) < 0.008


def test_levels_ties_missing_truths_and_bad_shapes():
    s = np.array([[0.0, 1.0, 2.0, 3.0]])
    # Two draws denser, one tied: the level lies between 2/5 and 4/5 (V spread over the tied ranks).
    many = hdr_levels(np.repeat(s, 4000, 0), np.ones(4000))
    assert many.min() >= 2 / 5 and many.max() <= 4 / 5 and np.mean(many) == pytest.approx(3 / 5, abs=0.01)
    assert 0.0 <= hdr_levels(s, np.array([10.0]))[0] <= 1 / 5  # denser than every draw
    assert 4 / 5 <= hdr_levels(s, np.array([-10.0]))[0] <= 1.0  # sparser than every draw
    # A flat density (every draw tied with the truth) gives a uniform level, not a fixed one.
    flat = hdr_levels(np.zeros((4000, 8)), np.zeros(4000))
    assert abs(coverage(flat)[0.5] - 0.5) < 0.03
    assert math.isnan(hdr_levels(s, np.array([math.nan]))[0])
    assert coverage(np.array([math.nan, 0.1]))[0.5] == 0.5  # a missing density counts as outside
    with pytest.raises(InputError):
        hdr_levels(s, np.array([1.0, 2.0]))
    with pytest.raises(InputError):
        region_area_km2(s, 1.5)
    with pytest.raises(InputError):
        fit_level_map(np.arange(5) / 5)
