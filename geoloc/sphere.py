"""Geometry of the unit sphere S² and of flat R³, in the one convention geoloc uses everywhere.

Coordinates:
- ``latlon``: degrees, shape ``(..., 2)``, order (latitude, longitude); latitude in [-90, 90], longitude in
  [-180, 180].
- ``xyz``: unit vectors, shape ``(..., 3)``, with x = cos(lat)cos(lon), y = cos(lat)sin(lon), z = sin(lat):
  x points to (0°N, 0°E), y to (0°N, 90°E), z to the North Pole (a right-handed, ECEF-like frame; the same as
  the reference, docs/reference-behaviour.md §3.2). Radians appear only inside this module.

The maps are written to be stable where naive formulas are not: angles come from ``atan2(|x×y|, x·y)``
(accurate for identical *and* antipodal points, unlike ``acos``), the exponential map uses a series for tiny
steps, and the logarithm at an antipodal point picks a deterministic tangent direction instead of dividing by
zero. No distance floors: the reference's geoopt floors distances at ~90 km
(docs/reference-behaviour.md §16.9); we do not.

:class:`Sphere` and :class:`Euclidean` give the solvers one interface (``project``, ``to_tangent``,
``step``), so the same integration loop serves flat and curved families.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from geoloc.errors import InputError

__all__ = [
    "EARTH_RADIUS_KM",
    "UNIFORM_LOG_DENSITY",
    "Euclidean",
    "Sphere",
    "angle",
    "equal_area_grid",
    "expmap",
    "geodesic",
    "haversine_km",
    "latlon_to_xyz",
    "logmap",
    "normalize_latlon",
    "proj_tangent",
    "project",
    "sample_uniform",
    "tangent_basis",
    "validate_latlon",
    "xyz_to_latlon",
]

EARTH_RADIUS_KM = 6371.0
"""Mean Earth radius used by every published metric (OSV-5M, PLONK)."""

UNIFORM_LOG_DENSITY = -math.log(4.0 * math.pi)
"""Log-density of the uniform distribution on S², per steradian."""

_TINY = 1e-12


def validate_latlon(latlon: Any, what: str = "coordinates") -> None:
    """Raise :class:`InputError` naming the offending rows if any lat/lon is NaN, infinite or out of range.

    Args:
        latlon: array-like ``(N, 2)`` in degrees, (lat, lon).
        what: a name for the input used in the message (e.g. a file name).
    """
    arr = latlon.detach().cpu().numpy() if isinstance(latlon, torch.Tensor) else np.asarray(latlon, float)
    if arr.ndim != 2 or arr.shape[-1] != 2:
        raise InputError(f"{what}: expected an (N, 2) array of (lat, lon) degrees, got shape {arr.shape}")
    bad_nan = ~np.isfinite(arr).all(axis=1)
    with np.errstate(invalid="ignore"):
        bad_lat = np.abs(arr[:, 0]) > 90.0
        bad_lon = np.abs(arr[:, 1]) > 180.0
    bad = bad_nan | bad_lat | bad_lon
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(str(int(r)) for r in rows[:10]) + (" ..." if len(rows) > 10 else "")
        reasons = []
        if bad_nan.any():
            reasons.append(f"{int(bad_nan.sum())} NaN/inf")
        if bad_lat.any():
            reasons.append(f"{int(bad_lat.sum())} with |lat| > 90")
        if bad_lon.any():
            reasons.append(f"{int(bad_lon.sum())} with |lon| > 180")
        raise InputError(
            f"{what}: {len(rows)} invalid row(s) ({', '.join(reasons)}) at index {shown}; "
            "fix or drop them (latitude must be in [-90, 90], longitude in [-180, 180])"
        )


def normalize_latlon(latlon: torch.Tensor) -> torch.Tensor:
    """Wrap arbitrary (lat, lon) degrees into [-90, 90] x [-180, 180), as the reference loaders do.

    A latitude past a pole continues on the other side of the globe (lon + 180);
    docs/reference-behaviour.md §3.1.
    """
    lat = torch.remainder(latlon[..., 0] + 90.0, 360.0) - 90.0
    lon = latlon[..., 1]
    over = lat > 90.0
    lat = torch.where(over, 180.0 - lat, lat)
    lon = torch.where(over, lon + 180.0, lon)
    lon = torch.remainder(lon + 180.0, 360.0) - 180.0
    return torch.stack([lat, lon], dim=-1)


def latlon_to_xyz(latlon: Any, dtype: Any = np.float32) -> Any:
    """Degrees ``(..., 2)`` → unit vectors ``(..., 3)`` (see the module docstring for the axes).

    A numpy array gives unit vectors computed in float64 numpy, returned as ``dtype`` (float32 for the
    loader's thread: torch's shared intra-op pool makes tiny torch ops 100x slower there under contention;
    float64 for the metrics' exact distance tests); a tensor gives a tensor (``dtype`` is then unused).
    """
    if isinstance(latlon, np.ndarray):
        la, lo = np.radians(latlon[..., 0]), np.radians(latlon[..., 1])
        c = np.cos(la)
        return np.stack([c * np.cos(lo), c * np.sin(lo), np.sin(la)], axis=-1).astype(dtype, copy=False)
    rad = torch.deg2rad(latlon)
    lat, lon = rad[..., 0], rad[..., 1]
    c = torch.cos(lat)
    return torch.stack([c * torch.cos(lon), c * torch.sin(lon), torch.sin(lat)], dim=-1)


def xyz_to_latlon(xyz: torch.Tensor) -> torch.Tensor:
    """Any non-zero vectors ``(..., 3)`` → degrees ``(..., 2)``.

    # reference differs: it uses asin(z) on the raw, unnormalised output, which gives NaN for |z| > 1 and
    # biased latitudes otherwise (docs/reference-behaviour.md §3.3, §16.4). atan2 needs no normalisation and
    # is exact at the poles.
    """
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lat = torch.atan2(z, torch.hypot(x, y))
    lon = torch.atan2(y, x)
    return torch.rad2deg(torch.stack([lat, lon], dim=-1))


def project(x: torch.Tensor) -> torch.Tensor:
    """Radial projection onto S²: ``x / |x|``."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def proj_tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of ``v`` onto the tangent plane at the unit vector ``x``: ``v - (x·v) x``."""
    return v - (x * v).sum(-1, keepdim=True) * x


def angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Great-circle angle in radians between unit vectors; accurate near 0 and near π."""
    return torch.atan2(torch.linalg.cross(x, y).norm(dim=-1), (x * y).sum(-1))


def _sinc(a: torch.Tensor) -> torch.Tensor:
    """sin(a)/a, with its Taylor series below 1e-4 (fp32-safe)."""
    small = a.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(a), a)
    return torch.where(small, 1.0 - a * a / 6.0, torch.sin(safe) / safe)


def expmap(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exponential map on S²: walk from ``x`` along the tangent vector ``v`` for a length ``|v|``."""
    n = v.norm(dim=-1, keepdim=True)
    return project(torch.cos(n) * x + _sinc(n) * v)


def _any_tangent(x: torch.Tensor) -> torch.Tensor:
    """A deterministic unit tangent vector at ``x`` (used where the direction is undefined)."""
    # Cross with the coordinate axis least aligned with x, so the result is never near zero.
    axis = torch.zeros_like(x)
    idx = x.abs().argmin(dim=-1, keepdim=True)
    axis.scatter_(-1, idx, 1.0)
    return project(torch.linalg.cross(x, axis))


def tangent_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis (e₁, e₂) of the tangent plane at each unit vector ``x``, smooth almost everywhere."""
    e1 = _any_tangent(x)
    return e1, torch.linalg.cross(x, e1)


def logmap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logarithm on S²: the tangent vector at ``x`` pointing to ``y`` with length = their angle.

    Identical points give 0. Antipodal points (angle π, direction undefined) get a deterministic direction.
    """
    u = proj_tangent(x, y)
    un = u.norm(dim=-1, keepdim=True)
    theta = angle(x, y).unsqueeze(-1)
    degenerate = un < 1e-7
    direction = torch.where(degenerate, _any_tangent(x), u / un.clamp_min(_TINY))
    # At identical points theta is ~0, so the arbitrary direction is multiplied by 0.
    return theta * direction


def geodesic(x0: torch.Tensor, x1: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Point and velocity of the constant-speed geodesic from ``x0`` (s=0) to ``x1`` (s=1).

    Args:
        x0, x1: unit vectors ``(..., 3)``.
        s: ``(...)`` or broadcastable, position along the path in [0, 1].

    Returns:
        ``(x_s, dx_s/ds)``: the point and its tangent velocity, whose length is the angle between x0 and x1.
        Closed form (no JVP): with v = log_{x0}(x1), θ = |v|, e = v/θ,
        x_s = cos(sθ) x0 + sin(sθ) e and dx_s/ds = θ(−sin(sθ) x0 + cos(sθ) e).
    """
    v = logmap(x0, x1)
    theta = v.norm(dim=-1, keepdim=True)
    e = torch.where(theta > _TINY, v / theta.clamp_min(_TINY), torch.zeros_like(v))
    st = s.unsqueeze(-1) * theta if s.dim() == theta.dim() - 1 else s * theta
    xs = torch.cos(st) * x0 + torch.sin(st) * e
    vel = theta * (-torch.sin(st) * x0 + torch.cos(st) * e)
    return xs, vel


def haversine_km(a: Any, b: Any) -> Any:
    """Great-circle distance in km between (lat, lon) degree arrays ``(..., 2)``; R = 6371 km.

    Accepts numpy arrays (computed in float64) or torch tensors (computed in their dtype). This is the
    published metric's formula (docs/reference-behaviour.md §10): d = 2R·atan2(√h, √(1−h)), h = sin²(Δφ/2) +
    cos φ₁ cos φ₂ sin²(Δλ/2).
    """
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        lib: Any = torch
        a_r, b_r = torch.deg2rad(torch.as_tensor(a)), torch.deg2rad(torch.as_tensor(b))
    else:
        lib = np
        a_r, b_r = np.deg2rad(np.asarray(a, np.float64)), np.deg2rad(np.asarray(b, np.float64))
    dlat = b_r[..., 0] - a_r[..., 0]
    dlon = b_r[..., 1] - a_r[..., 1]
    h = lib.sin(dlat / 2) ** 2 + lib.cos(a_r[..., 0]) * lib.cos(b_r[..., 0]) * lib.sin(dlon / 2) ** 2
    h = lib.clip(h, 0.0, 1.0)
    return 2.0 * EARTH_RADIUS_KM * lib.arctan2(lib.sqrt(h), lib.sqrt(1.0 - h))


def sample_uniform(
    n: int | tuple[int, ...],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform points on S² (normalised Gaussians), shape ``(*n, 3)``; log-density ``UNIFORM_LOG_DENSITY``."""
    shape = (n,) if isinstance(n, int) else tuple(n)
    g = torch.randn((*shape, 3), generator=generator, dtype=dtype, device=device)
    return project(g)


def equal_area_grid(n_lat: int, n_lon: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """Centres of an equal-area grid on S² (uniform in sin(lat) and lon) and the area of one cell.

    Used for quadrature: ∫_{S²} f ≈ area · Σ f(centres). Returns ``(xyz (n_lat*n_lon, 3), area_sr)``.
    """
    z = -1.0 + (torch.arange(n_lat, dtype=dtype) + 0.5) * (2.0 / n_lat)
    lon = -math.pi + (torch.arange(n_lon, dtype=dtype) + 0.5) * (2.0 * math.pi / n_lon)
    zz, ll = torch.meshgrid(z, lon, indexing="ij")
    r = torch.sqrt((1.0 - zz * zz).clamp_min(0.0))
    xyz = torch.stack([r * torch.cos(ll), r * torch.sin(ll), zz], dim=-1).reshape(-1, 3)
    return xyz, 4.0 * math.pi / (n_lat * n_lon)


class Sphere:
    """S² as a space the solvers integrate on: states stay unit vectors, velocities stay tangent.

    ``step`` uses the exponential map; ``retraction="project"`` gives the reference's ambient Euler step
    followed by normalisation (docs/reference-behaviour.md §7.3), which published sampling numbers used.
    """

    name = "sphere"
    dim = 2

    def __init__(self, retraction: str = "exp") -> None:
        if retraction not in ("exp", "project"):
            raise ValueError(f"unknown retraction {retraction!r}; choose 'exp' or 'project'")
        self.retraction = retraction

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return project(x)

    def to_tangent(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return proj_tangent(x, v)

    def step(self, x: torch.Tensor, v: torch.Tensor, h: float | torch.Tensor) -> torch.Tensor:
        if self.retraction == "project":
            return project(x + h * v)
        return expmap(x, h * proj_tangent(x, v))


class Euclidean:
    """Flat R³: the identity versions of :class:`Sphere`'s operations."""

    name = "euclidean"
    dim = 3

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def to_tangent(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v

    def step(self, x: torch.Tensor, v: torch.Tensor, h: float | torch.Tensor) -> torch.Tensor:
        return x + h * v
