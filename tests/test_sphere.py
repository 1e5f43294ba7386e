"""Sphere geometry: round trips, maps and distances, including poles, antipodes and the antimeridian."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geoloc.errors import InputError
from geoloc.sphere import (
    EARTH_RADIUS_KM,
    angle,
    equal_area_grid,
    expmap,
    geodesic,
    haversine_km,
    latlon_to_xyz,
    logmap,
    normalize_latlon,
    sample_uniform,
    validate_latlon,
    xyz_to_latlon,
)

lat_s = st.floats(-90, 90, allow_nan=False)
lon_s = st.floats(-180, 180, allow_nan=False)


def unit(lat, lon):
    return latlon_to_xyz(torch.tensor([[lat, lon]], dtype=torch.float64))[0]


def test_axes_convention():
    assert torch.allclose(unit(0, 0), torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(unit(0, 90), torch.tensor([0, 1.0, 0], dtype=torch.float64))
    assert torch.allclose(unit(90, 0), torch.tensor([0, 0, 1.0], dtype=torch.float64), atol=1e-15)


@given(lat_s, lon_s)
def test_latlon_round_trip(lat, lon):
    back = xyz_to_latlon(unit(lat, lon).unsqueeze(0))[0]
    assert abs(float(back[0]) - lat) < 1e-9
    if abs(lat) < 90 - 1e-6:  # longitude is undefined at the poles
        d = (float(back[1]) - lon + 180) % 360 - 180
        assert abs(d) < 1e-7


def test_xyz_to_latlon_needs_no_normalisation():
    # reference differs: asin(z) on a non-unit vector gives NaN; atan2 does not.
    x = torch.tensor([[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    assert torch.allclose(xyz_to_latlon(x), torch.tensor([[90.0, 0.0], [0.0, 0.0]]))


@settings(max_examples=200)
@given(lat_s, lon_s, lat_s, lon_s)
def test_exp_log_inverse(lat1, lon1, lat2, lon2):
    x, y = unit(lat1, lon1), unit(lat2, lon2)
    v = logmap(x, y)
    assert abs(float((v * x).sum())) < 1e-9  # tangent
    assert abs(float(v.norm()) - float(angle(x, y))) < 1e-9
    if float(angle(x, y)) < math.pi - 1e-6:  # antipodes: any direction is a geodesic
        assert float(angle(expmap(x, v), y)) < 1e-7


def test_identical_and_antipodal_points_are_stable():
    x = unit(10.0, 20.0).unsqueeze(0)
    assert float(logmap(x, x).norm()) < 1e-15
    anti = -x
    v = logmap(x, anti)
    assert torch.isfinite(v).all() and abs(float(v.norm()) - math.pi) < 1e-12
    assert float(angle(expmap(x, v), anti)) < 1e-7
    assert float(angle(x, anti)) == pytest.approx(math.pi)


@given(lat_s, lon_s, lat_s, lon_s, st.floats(0, 1))
def test_geodesic_endpoints_and_speed(lat1, lon1, lat2, lon2, s):
    x0, x1 = unit(lat1, lon1).unsqueeze(0), unit(lat2, lon2).unsqueeze(0)
    xs, vel = geodesic(x0, x1, torch.tensor([s], dtype=torch.float64))
    assert abs(float(xs.norm()) - 1) < 1e-12
    assert abs(float(vel.norm()) - float(angle(x0, x1))) < 1e-9  # constant speed = the angle
    assert abs(float((vel * xs).sum())) < 1e-9  # tangent at x_s
    if float(angle(x0, x1)) < math.pi - 1e-6:
        assert float(angle(xs, x0)) == pytest.approx(s * float(angle(x0, x1)), abs=1e-7)
    # velocity = derivative of the point (finite difference)
    h = 1e-6
    s2 = s + h if s + h <= 1.0 else s - h  # a one-sided difference of width h, inside [0, 1]
    xs2, _ = geodesic(x0, x1, torch.tensor([s2], dtype=torch.float64))
    if float(angle(x0, x1)) < math.pi - 1e-3:  # at antipodes the geodesic direction is a convention
        assert torch.allclose((xs2 - xs) / (s2 - s), vel, atol=1e-4)


def test_haversine_known_distances():
    paris, london = np.array([48.8566, 2.3522]), np.array([51.5074, -0.1278])
    assert haversine_km(paris, london) == pytest.approx(343.5, abs=1.0)
    # across the antimeridian: 0.2° of longitude at the equator
    assert haversine_km(np.array([0.0, 179.9]), np.array([0.0, -179.9])) == pytest.approx(
        0.2 * math.pi / 180 * EARTH_RADIUS_KM, rel=1e-9
    )
    assert haversine_km(np.array([90.0, 0.0]), np.array([-90.0, 0.0])) == pytest.approx(
        math.pi * EARTH_RADIUS_KM
    )
    t = haversine_km(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 90.0]]))
    assert float(t[0]) == pytest.approx(math.pi / 2 * EARTH_RADIUS_KM, rel=1e-6)


@given(lat_s, lon_s, lat_s, lon_s)
def test_haversine_matches_angle(lat1, lon1, lat2, lon2):
    d = haversine_km(np.array([lat1, lon1]), np.array([lat2, lon2]))
    a = float(angle(unit(lat1, lon1), unit(lat2, lon2))) * EARTH_RADIUS_KM
    # The published haversine form loses precision near antipodes (√(1−h) with h → 1): ~R·√ε ≈ 1e-4 km.
    assert d == pytest.approx(a, abs=1e-3)


def test_uniform_sampling_and_equal_area_grid():
    x = sample_uniform(200_000, torch.Generator().manual_seed(0), torch.float64)
    assert torch.allclose(x.norm(dim=-1), torch.ones(len(x), dtype=torch.float64))
    assert x.mean(0).abs().max() < 0.01  # uniform: zero mean
    assert (x[:, 2].abs() < 0.5).double().mean() == pytest.approx(0.5, abs=0.01)  # equal area in z
    xyz, area = equal_area_grid(30, 60)
    assert area * len(xyz) == pytest.approx(4 * math.pi)


def test_normalize_latlon_wraps_like_the_reference():
    out = normalize_latlon(torch.tensor([[95.0, 10.0], [0.0, 190.0], [-100.0, -170.0]]))
    assert torch.allclose(out, torch.tensor([[85.0, -170.0], [0.0, -170.0], [-80.0, 10.0]]))


def test_validate_latlon_names_bad_rows():
    good = np.array([[0.0, 0.0], [45.0, 90.0]])
    validate_latlon(good)
    bad = np.array([[0.0, 0.0], [np.nan, 1.0], [91.0, 0.0], [0.0, 181.0]])
    with pytest.raises(InputError, match=r"3 invalid row\(s\).*index 1, 2, 3"):
        validate_latlon(bad, "test.csv")
    with pytest.raises(ValueError):
        validate_latlon(np.zeros((3, 3)))
