"""Retrieval baselines: the weighted expected GeoScore against its formula, and the answers it picks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geoloc.errors import ConfigError, InputError
from geoloc.metrics import GEOSCORE_MAX, GEOSCORE_SCALE_KM
from geoloc.retrieval import (
    nearest_neighbour,
    neighbour_log_weights,
    weighted_expected_geoscore,
    weighted_retrieval,
)
from geoloc.sphere import haversine_km, latlon_to_xyz

EUROPE = [(48.85, 2.35), (50.85, 4.35), (52.52, 13.40)]  # Paris, Brussels, Berlin
SYDNEY = (-33.87, 151.21)


def _xyz(latlon) -> torch.Tensor:
    return latlon_to_xyz(torch.tensor(latlon, dtype=torch.float64))


def test_weighted_expected_geoscore_is_the_weighted_mean_of_the_formula():
    rng = np.random.default_rng(0)
    pts = np.stack([rng.uniform(-80, 80, 6), rng.uniform(-180, 180, 6)], 1)
    cand = np.stack([rng.uniform(-80, 80, 4), rng.uniform(-180, 180, 4)], 1)
    w = rng.dirichlet(np.ones(6))
    got = weighted_expected_geoscore(_xyz(cand)[None], _xyz(pts)[None], torch.tensor(np.log(w))[None])[0]
    for i, c in enumerate(cand):
        d = haversine_km(np.repeat(c[None], 6, 0), pts)
        want = float((w * GEOSCORE_MAX * np.exp(-d / GEOSCORE_SCALE_KM)).sum())
        assert float(got[i]) == pytest.approx(want, rel=1e-6)


def test_weights_choose_between_the_top_neighbour_and_the_crowd():
    # The most similar neighbour is in Sydney; three slightly less similar ones agree on Western Europe.
    xyz = _xyz([SYDNEY, *EUROPE])[None]
    sim = torch.tensor([[0.90, 0.85, 0.84, 0.83]], dtype=torch.float64)
    assert torch.allclose(nearest_neighbour(xyz), xyz[:, 0])
    assert torch.allclose(weighted_retrieval(xyz, sim, tau=1e-3), xyz[:, 0])  # τ → 0 is 1-NN
    assert torch.allclose(weighted_retrieval(xyz, sim, tau=1.0, k=1), xyz[:, 0])  # so is k = 1
    crowd = weighted_retrieval(xyz, sim, tau=0.5)
    assert torch.allclose(crowd, xyz[:, 2])  # Brussels: the neighbour closest to the other two


def test_missing_neighbours_get_no_weight_and_are_never_answers():
    xyz = _xyz([EUROPE[0], SYDNEY, SYDNEY])[None]
    sim = torch.tensor([[0.5, -math.inf, -math.inf]])
    w = neighbour_log_weights(sim, 0.1).exp()
    assert torch.allclose(w, torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(weighted_retrieval(xyz.float(), sim, tau=0.1), xyz[:, 0].float())
    with pytest.raises(InputError):
        neighbour_log_weights(torch.full((1, 2), -math.inf), 0.1)
    with pytest.raises(ConfigError):
        neighbour_log_weights(sim, 0.0)
    with pytest.raises(InputError):
        weighted_retrieval(xyz, sim[:, :2], tau=0.1)


def test_label_weight_moves_the_answer_to_the_label_mode():
    """Three weighted points on the equator, 10° apart: the middle one (label 2, weight 0.3) maximises
    expected GeoScore, but label 1 holds 0.7 of the mass; with label agreement in the score the answer is the
    heaviest label-1 point, and the score is the formula's."""
    from geoloc.retrieval import best_expected_answer, expected_label_agreement

    pts = _xyz([(0.0, 0.0), (0.0, 10.0), (0.0, 20.0)])[None]
    log_w = torch.tensor([[0.3, 0.3, 0.4]], dtype=torch.float64).log()
    labels = {"country": torch.tensor([[1, 2, 1]])}
    assert torch.allclose(best_expected_answer(pts, log_w), pts[:, 1])
    assert torch.allclose(best_expected_answer(pts, log_w, labels, 0.0), pts[:, 1])
    assert torch.allclose(best_expected_answer(pts, log_w, labels, 1.0), pts[:, 2])
    agree = expected_label_agreement(labels["country"], labels["country"], log_w)
    assert torch.allclose(agree, torch.tensor([[0.7, 0.3, 0.7]], dtype=torch.float64))
    unlabelled = expected_label_agreement(torch.tensor([[-1, 2, -1]]), torch.tensor([[-1, 2, -1]]), log_w)
    assert torch.allclose(unlabelled, torch.tensor([[0.0, 0.3, 0.0]], dtype=torch.float64))
    with pytest.raises(ConfigError):
        best_expected_answer(pts, log_w, labels, -1.0)
