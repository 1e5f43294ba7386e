"""Point estimates and top-k modes from samples on the sphere.

A generative model answers with a distribution; a benchmark wants one point, and a user wants "one answer plus
a confidence". Different metrics have different optimal points, so each estimator here is the (approximate)
minimiser of one risk, computed from ``n`` samples per item:

- ``mean``: the normalised mean vector (minimises the mean squared chord distance); a cheap baseline.
- ``median``: the geodesic (geometric) median, which minimises the mean great-circle distance, i.e. the
  mean km error. Weiszfeld's algorithm run in the tangent space.
- ``geoscore``: the point maximising the expected GeoScore 5000·exp(−d_km/1492.7)
  (docs/reference-behaviour.md §10).
- ``mode``: the highest mode of a von Mises–Fisher kernel density estimate (accuracy within small radii).
- ``best-of-n``: the sample with the highest exact model likelihood (docs/reference-behaviour.md §8.2, the
  "swarm" mode).
- :func:`top_k_modes`: distinct modes with the fraction of samples in each mode's basin of attraction
  (every sample counted once, in a mode or in "other"); :func:`basin_of` says which mode a point estimate
  falls in, so an estimate between modes can be labelled as such.

The reference has no top-k and a KDE in (lat, lon) radians with a batch-global bandwidth
(docs/reference-behaviour.md §9.6, §16.14); the KDE here is a sum of von Mises–Fisher kernels on S², so it has
no seams at the antimeridian or the poles, with a bandwidth per sample from its k-th nearest neighbour
(:func:`kde_bandwidth_km`), so that a city-sharp mode and a country-wide one in the same prediction are both
found whole.

Shapes: ``samples`` are unit vectors ``(B, n, 3)``; every estimator returns ``(B, 3)`` in the samples' dtype
and device (half precision is computed in float32). Everything is batched over B with matrix operations;
pairwise work is chunked to bound memory (``n`` ~ 1000 per item, B in the thousands). No gradients flow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from geoloc.errors import ConfigError, InputError
from geoloc.metrics import GEOSCORE_MAX, GEOSCORE_SCALE_KM
from geoloc.sphere import EARTH_RADIUS_KM, angle, expmap, logmap, project, xyz_to_latlon

__all__ = [
    "ESTIMATORS",
    "GEOSCORE_MAX",
    "GEOSCORE_SCALE_KM",
    "MAX_BANDWIDTH_KM",
    "MIN_BANDWIDTH_KM",
    "Estimator",
    "TopK",
    "basin_of",
    "best_by_likelihood",
    "density_mode",
    "expected_geoscore",
    "geodesic_median",
    "kde_bandwidth_km",
    "kde_log_density",
    "max_expected_geoscore",
    "mean_shift",
    "point_mean_direction",
    "top_k_modes",
]


MIN_BANDWIDTH_KM = 1.0
"""Floor of the KDE bandwidth: identical samples (a collapsed model) would otherwise give an infinite
concentration. Sub-km structure is below what any geolocation model resolves."""

MAX_BANDWIDTH_KM = 1000.0
"""Ceiling of the adaptive KDE bandwidth. A group of samples smaller than the k of the k-NN rule (24 samples
in Europe beside 232 in the US) gets the distance to the *other* group as its bandwidth, kernels as wide as
an ocean, and mean-shift then carries it into the big mode: one mode at 100% while a tenth of the samples
lie 7,000 km away. With kernels at most 1,000 km wide, two groups more than ~3,000 km apart always keep
separate density maxima (two Gaussian bumps of widths ≤ √(σ² + h²) merge only when closer than about twice
that width), so distant basins are never merged by the smoothing alone."""

_CHUNK_ELEMENTS = 1 << 22  # max pairwise entries (B × rows × n) held at once: ~16 MB per float32 buffer
_MEDIAN_STARTS = 32  # samples tried (with the mean direction) as the median's starting point
_MODE_POOL = 256  # samples whose KDE density picks the starts of density_mode
_MODE_STARTS = 8  # mean-shift starts of density_mode
_BASIN_TOL = (
    1e-2  # mean-shift stop for basin assignment, in bandwidths: the point is then ~0.1 h from its mode
)
_MODE_TOL = 1e-4  # mean-shift stop when locating a mode, in bandwidths
_MAX_STRETCH = 32.0  # largest over-relaxation factor of a mean-shift step

LogProbFn = Callable[[Tensor], Tensor]
"""``(B, m, 3)`` unit vectors → ``(B, m)`` natural-log density per steradian."""


# ----------------------------------------------------------------------------------------------- helpers


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are processed in float32: mean-shift and Weiszfeld need more than 3 digits."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_samples(samples: Tensor, what: str = "samples") -> Tensor:
    """Validate ``(B, n, 3)`` finite vectors and return them projected onto S² in the working dtype."""
    if not isinstance(samples, Tensor) or samples.dim() != 3 or samples.shape[-1] != 3:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise InputError(f"{what}: expected a (B, n, 3) tensor of unit vectors, got {shape}")
    if samples.shape[1] < 1:
        raise InputError(f"{what}: need at least one sample per item, got shape {tuple(samples.shape)}")
    if not samples.is_floating_point():
        raise InputError(f"{what}: expected a floating-point tensor, got {samples.dtype}")
    x = samples.detach().to(_work_dtype(samples.dtype))
    bad = ~torch.isfinite(x).all(dim=-1).all(dim=-1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(str(r) for r in rows[:10]) + (" ..." if len(rows) > 10 else "")
        raise InputError(
            f"{what}: {len(rows)} item(s) with NaN/inf samples at batch index {shown}; "
            "drop those items before estimating"
        )
    norm = x.norm(dim=-1)
    if (norm < 1e-6).any():
        raise InputError(f"{what}: zero-length vectors cannot be placed on the sphere; pass unit vectors")
    return project(x)


def _per_item(value: float | Tensor | None, ref: Tensor, what: str) -> Tensor | None:
    """A scalar or ``(B,)`` positive parameter as a ``(B,)`` tensor on ``ref``'s device and dtype."""
    if value is None:
        return None
    v = torch.as_tensor(value, dtype=ref.dtype, device=ref.device).detach()
    v = v.expand(ref.shape[0]) if v.dim() == 0 else v
    if v.shape != (ref.shape[0],) or not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
        raise ConfigError(
            f"{what}: expected a positive finite number or one per item "
            f"({ref.shape[0]} values), got {value!r}"
        )
    return v.clone()


def _row_chunks(rows: int, batch: int, n: int) -> Iterator[slice]:
    """Slices over ``rows`` so that one chunk holds at most ``_CHUNK_ELEMENTS`` pairwise entries."""
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * n))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _pairwise_chord(a: Tensor, b: Tensor) -> Tensor:
    """Chord lengths |a_i − b_j| ``(B, m, n)`` computed from differences, not from 2 − 2·a·b.

    The dot-product form loses everything below ~1e-4 rad in float32 (cos θ ≈ 1 − θ²/2), which would wreck
    kernels with km-scale bandwidths; ``cdist`` without the matrix-product shortcut keeps full precision.
    """
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _chord_to_angle(chord: Tensor) -> Tensor:
    return 2.0 * torch.asin((0.5 * chord).clamp(0.0, 1.0))


def _strided(samples: Tensor, count: int) -> Tensor:
    """At most ``count`` samples spread evenly over the n axis (samples are i.i.d., any subset is random)."""
    n = samples.shape[1]
    if n <= count:
        return samples
    idx = torch.linspace(0, n - 1, count, device=samples.device).round().long()
    return samples[:, idx]


def _gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, j]]`` for ``x`` (B, n, 3) and ``idx`` (B, m)."""
    return x.gather(1, idx.unsqueeze(-1).expand(*idx.shape, 3))


# ------------------------------------------------------------------------------------- simple estimators


def point_mean_direction(samples: Tensor) -> Tensor:
    """Normalised mean of the samples ``(B, n, 3)`` → ``(B, 3)``: cheap, but pulled toward the chord
    between distant modes (the mean of Paris and Sydney samples lies deep inside the Earth, over Asia).

    When the mean vector vanishes (perfectly balanced antipodal samples) the first sample is returned.
    """
    return _mean_direction(_check_samples(samples)).to(samples.dtype)


def _mean_direction(x: Tensor) -> Tensor:
    m = x.mean(dim=1)
    degenerate = m.norm(dim=-1, keepdim=True) < 1e-6
    return torch.where(degenerate, x[:, 0], project(m))


def best_by_likelihood(samples: Tensor, log_prob: Tensor) -> Tensor:
    """The sample with the highest log density ``log_prob`` ``(B, n)``.

    The reference's "swarm" mode: best of 32 by NLL (docs/reference-behaviour.md §8.2).
    NaN log densities count as −∞; an item whose log densities are all NaN gets its first sample.
    """
    x = _check_samples(samples)
    if not isinstance(log_prob, Tensor) or log_prob.shape != x.shape[:2]:
        got = tuple(log_prob.shape) if isinstance(log_prob, Tensor) else type(log_prob).__name__
        raise InputError(f"log_prob: expected shape {tuple(x.shape[:2])} (one value per sample), got {got}")
    lp = log_prob.detach().to(device=x.device)
    lp = torch.where(torch.isnan(lp), torch.full_like(lp, -math.inf), lp)
    idx = lp.argmax(dim=1, keepdim=True)
    return _gather_points(x, idx)[:, 0].to(samples.dtype)


# ------------------------------------------------------------------------------------ geodesic median


def _weiszfeld_step(x: Tensor, samples: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Weiszfeld step for min_x Σ_j w_j θ(x, s_j) on S², taken in the tangent space at ``x``.

    Returns ``(x_next (B, 3), step angle (B,), objective at x (B,))``. The update is
    x ← exp_x(Σ w_j log_x(s_j)/θ_j / Σ w_j/θ_j) (Fletcher et al. 2009). Samples at the iterate (θ ≈ 0, where
    1/θ blows up) are handled as Vardi & Zhang (2000) do: they leave the sum, and the step is shrunk by
    (1 − η/r)⁺, where η is their total weight and r the pull of the others; x is optimal when r ≤ η.
    """
    v = logmap(x.unsqueeze(1), samples)  # (B, n, 3); |v| = θ
    theta = v.norm(dim=-1)
    eps = 10.0 * torch.finfo(x.dtype).eps
    at = theta <= eps
    inv = torch.where(at, torch.zeros_like(theta), weights / theta.clamp_min(eps))
    pull = (inv.unsqueeze(-1) * v).sum(dim=1)  # (B, 3): minus the gradient of Σ w θ
    den = inv.sum(dim=1, keepdim=True)
    eta = (weights * at).sum(dim=1, keepdim=True)
    r = pull.norm(dim=-1, keepdim=True)
    shrink = (1.0 - eta / r.clamp_min(1e-30)).clamp_min(0.0)
    step = torch.where(den > 0, shrink * pull / den.clamp_min(1e-30), torch.zeros_like(pull))
    objective = (weights * theta).sum(dim=1) / weights.sum(dim=1)
    return expmap(x, step), step.norm(dim=-1), objective


def _weighted_mean_angle(points: Tensor, samples: Tensor) -> Tensor:
    """Mean great-circle angle from each of ``points`` (B, m, 3) to the samples: ``(B, m)``, chunked."""
    b, m, _ = points.shape
    out = torch.empty(points.shape[:2], dtype=points.dtype, device=points.device)
    for sl in _row_chunks(m, b, samples.shape[1]):
        out[:, sl] = _chord_to_angle(_pairwise_chord(points[:, sl], samples)).mean(dim=-1)
    return out


def geodesic_median(samples: Tensor, iters: int = 50, tol: float = 1e-7) -> Tensor:
    """Geodesic median ``(B, 3)``: the point minimising the mean great-circle distance to the samples.

    This is the Bayes-optimal point for the mean km error. Weiszfeld iterations in the tangent space (see
    :func:`_weiszfeld_step`), started from the best of the mean direction and up to 32 samples (so a bimodal
    set starts inside the heavier mode, not at the empty midpoint), stopping when every item's step is below
    ``tol`` radians (floored at the dtype's resolution). The best iterate seen is returned, so the result is
    never worse than the starting point even where the sphere's curvature breaks Weiszfeld's monotonicity.
    """
    if iters < 1:
        raise ConfigError(f"geodesic_median: iters must be >= 1, got {iters}")
    x = _check_samples(samples)
    with torch.no_grad():
        starts = torch.cat([_mean_direction(x).unsqueeze(1), _strided(x, _MEDIAN_STARTS)], dim=1)
        first = _weighted_mean_angle(starts, x).argmin(dim=1, keepdim=True)
        cur = _gather_points(starts, first)[:, 0]
        weights = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        tol = max(tol, 4.0 * torch.finfo(x.dtype).eps)
        best, best_f = cur, torch.full(x.shape[:1], math.inf, dtype=x.dtype, device=x.device)
        for _ in range(iters):
            nxt, step, f = _weiszfeld_step(cur, x, weights)
            better = f < best_f
            best = torch.where(better.unsqueeze(-1), cur, best)
            best_f = torch.where(better, f, best_f)
            cur = nxt
            if bool((step <= tol).all()):
                break
        f = (logmap(cur.unsqueeze(1), x).norm(dim=-1)).mean(dim=1)
        best = torch.where((f < best_f).unsqueeze(-1), cur, best)
    return best.to(samples.dtype)


# --------------------------------------------------------------------------------- expected GeoScore


def _check_weights(weights: Tensor | None, x: Tensor) -> Tensor | None:
    """Per-sample importance weights ``(B, n)``: finite, ≥ 0, a positive sum per item; normalised to sum 1."""
    if weights is None:
        return None
    if not isinstance(weights, Tensor) or weights.shape != x.shape[:2]:
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise InputError(f"weights: expected shape {tuple(x.shape[:2])} (one per sample), got {got}")
    w = weights.detach().to(device=x.device, dtype=x.dtype)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise InputError("weights: importance weights must be finite and non-negative")
    total = w.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise InputError("weights: every item needs a positive total weight")
    return w / total


def _geoscore_of(candidates: Tensor, x: Tensor, w: Tensor | None) -> Tensor:
    """Expected GeoScore ``(B, m)`` of validated candidates under validated samples, normalised weights."""
    out = torch.empty(candidates.shape[:2], dtype=x.dtype, device=x.device)
    rate = EARTH_RADIUS_KM / GEOSCORE_SCALE_KM  # per radian
    for sl in _row_chunks(candidates.shape[1], candidates.shape[0], x.shape[1]):
        g = torch.exp(-rate * _chord_to_angle(_pairwise_chord(candidates[:, sl], x)))
        out[:, sl] = GEOSCORE_MAX * (g.mean(dim=-1) if w is None else (g @ w.unsqueeze(-1))[..., 0])
    return out


def expected_geoscore(candidates: Tensor, samples: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean GeoScore of each candidate ``(B, m, 3)`` against the samples ``(B, n, 3)``: ``(B, m)`` points.

    Equals the expected GeoScore of answering with that candidate when the truth follows the samples'
    distribution. ``weights`` ``(B, n)``: importance weights of the samples (e.g. target density / proposal
    density), normalised per item; default equal. Chunked over candidates.
    """
    c = _check_samples(candidates, "candidates")
    x = _check_samples(samples)
    if c.shape[0] != x.shape[0]:
        raise InputError(f"candidates: batch size {c.shape[0]} does not match samples' {x.shape[0]}")
    w = _check_weights(weights, x)
    with torch.no_grad():
        out = _geoscore_of(c, x, w)
    return out.to(samples.dtype)


def max_expected_geoscore(
    samples: Tensor,
    candidates: Tensor | None = None,
    refine_iters: int = 50,
    tol: float = 1e-7,
    extra_candidates: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """The point ``(B, 3)`` maximising the expected GeoScore E_s[5000·exp(−d_km(x, s)/1492.7)].

    First the best of ``candidates`` ``(B, m, 3)`` (default: the samples themselves) together with
    ``extra_candidates`` ``(B, m', 3)`` when given (points from elsewhere, e.g. retrieval neighbours, tried
    besides the samples), then ``refine_iters`` minorise–maximise steps: since exp(−κθ) is convex in θ,
    G(x) ≥ G(x₀) − κ·Σ w_j (θ_j(x) − θ_j(x₀)) with w_j = exp(−κθ_j(x₀)), so one Weiszfeld step on the
    w-weighted distance sum raises G. The best point seen is kept, so the result scores at least as well as
    every candidate (by construction). ``weights`` ``(B, n)``: importance weights of the samples (normalised
    per item; default equal), used in the expectation and in the refinement alike.
    """
    if refine_iters < 0:
        raise ConfigError(f"max_expected_geoscore: refine_iters must be >= 0, got {refine_iters}")
    x = _check_samples(samples)
    c = x if candidates is None else _check_samples(candidates, "candidates")
    if extra_candidates is not None:
        extra = _check_samples(extra_candidates, "extra_candidates").to(device=c.device, dtype=c.dtype)
        if extra.shape[0] != c.shape[0]:
            raise InputError(
                f"extra_candidates: batch size {extra.shape[0]} does not match samples' {c.shape[0]}"
            )
        c = torch.cat([c, extra], dim=1)
    if c.shape[0] != x.shape[0]:
        raise InputError(f"candidates: batch size {c.shape[0]} does not match samples' {x.shape[0]}")
    w = _check_weights(weights, x)
    w_or_one = torch.ones_like(x[..., 0]) if w is None else w
    rate = EARTH_RADIUS_KM / GEOSCORE_SCALE_KM
    with torch.no_grad():
        scores = _geoscore_of(c, x, w)
        best_f, first = scores.max(dim=1)
        best = _gather_points(c, first.unsqueeze(1))[:, 0]
        cur = best
        tol = max(tol, 4.0 * torch.finfo(x.dtype).eps)
        theta = logmap(cur.unsqueeze(1), x).norm(dim=-1)
        for _ in range(refine_iters):
            cur, step, _ = _weiszfeld_step(cur, x, w_or_one * torch.exp(-rate * theta))
            theta = logmap(cur.unsqueeze(1), x).norm(dim=-1)
            g = torch.exp(-rate * theta)
            f = GEOSCORE_MAX * (g.mean(dim=1) if w is None else (g * w).sum(dim=1))
            better = f > best_f
            best = torch.where(better.unsqueeze(-1), cur, best)
            best_f = torch.where(better, f, best_f)
            if bool((step <= tol).all()):
                break
    return best.to(samples.dtype)


# --------------------------------------------------------------------------------------- vMF KDE


def kde_bandwidth_km(samples: Tensor, max_km: float = MAX_BANDWIDTH_KM) -> Tensor:
    """Rule-of-thumb KDE bandwidths ``(B, n)`` in km, one per sample: its local kernel standard deviation.

    Rule: h_j = min(max(r_k(s_j), median_i r_k(s_i)), ``max_km``), where r_k is the great-circle distance to
    the k-th nearest neighbour with k = round(n^(3/4) / 4), floored at :data:`MIN_BANDWIDTH_KM`; the
    ceiling (default :data:`MAX_BANDWIDTH_KM`) keeps distant groups apart. Why:
    - Scale: for one 2-D Gaussian cluster of per-axis spread σ, the k-NN distance at the median-density point
      is ≈ 2σ·√(k/n) = σ·n^(−1/8): the rate that is optimal for estimating the density's gradient, which is
      what mean-shift follows (Scott's n^(−1/6) is for the density itself, and splits clusters of ~100 samples
      into spurious modes). A k-NN distance, unlike the global std/IQR of the reference
      (docs/reference-behaviour.md §9.6), is not inflated by far-apart modes: samples split between Paris and
      Sydney get the bandwidth of one city.
    - Adaptivity: where samples are sparser than at the median (tails, a broad secondary mode) the kernel
      widens with r_k ∝ f^(−1/2) (Abramson's square-root law in 2-D), so a country-wide spread beside a tight
      city cluster is smoothed at its own scale instead of breaking up into many small modes. Kernels never
      get narrower than the median, which would roughen the densest mode.
    - Ceiling: see :data:`MAX_BANDWIDTH_KM` (k-NN radii of a group smaller than k bridge oceans).
    With a single sample the floor is returned. Cost: n² distances per item, chunked.
    """
    if not max_km >= MIN_BANDWIDTH_KM:
        raise ConfigError(f"kde_bandwidth_km: max_km must be >= {MIN_BANDWIDTH_KM} km, got {max_km}")
    x = _check_samples(samples)
    b, n, _ = x.shape
    out = torch.full((b, n), MIN_BANDWIDTH_KM, dtype=x.dtype, device=x.device)
    if n < 2:
        return out.to(samples.dtype)
    k = int(min(n - 1, max(1, round(n**0.75 / 4.0))))
    with torch.no_grad():
        for sl in _row_chunks(n, b, n):
            chord = _pairwise_chord(x[:, sl], x)
            # Each sample is among its own neighbours at distance 0, so the (k+1)-th smallest is the k-th.
            kth = chord.topk(k + 1, dim=-1, largest=False).values[..., -1]
            out[:, sl] = torch.clamp_min(_chord_to_angle(kth) * EARTH_RADIUS_KM, MIN_BANDWIDTH_KM)
        out = torch.maximum(out, out.median(dim=1, keepdim=True).values).clamp_max(max_km)
    return out.to(samples.dtype)


@dataclass(frozen=True)
class _Kde:
    """A vMF kernel density estimate f(x) = (1/n) Σ_j C(κ_j) exp(κ_j(x·s_j − 1)) on validated samples.

    C(κ) = κ / (2π(1 − e^(−2κ))) normalises each kernel per steradian; κ_j = (R / h_j)² makes the kernel's
    local per-axis standard deviation h_j km. Exponents are written as −κ|x − s|²/2 from exact chord
    lengths and summed with log-sum-exp, so concentrations of 10⁸ (km-scale bandwidths) stay exact.
    """

    samples: Tensor  # (B, n, 3)
    bandwidth_km: Tensor  # (B, n)
    kappa: Tensor  # (B, n)
    log_c: Tensor  # (B, n)
    scale: Tensor  # (B,) median bandwidth in radians: the unit of tolerances and step caps

    @classmethod
    def build(cls, x: Tensor, bandwidth_km: float | Tensor | None) -> _Kde:
        h = kde_bandwidth_km(x) if bandwidth_km is None else _per_sample(bandwidth_km, x)
        kappa = (EARTH_RADIUS_KM / h) ** 2
        log_c = torch.log(kappa) - math.log(2.0 * math.pi) - torch.log(-torch.expm1(-2.0 * kappa))
        scale = h.median(dim=1).values / EARTH_RADIUS_KM
        return cls(x, h, kappa, log_c, scale)

    def select(self, items: Tensor) -> _Kde:
        return _Kde(
            self.samples[items],
            self.bandwidth_km[items],
            self.kappa[items],
            self.log_c[items],
            self.scale[items],
        )

    def _log_kernels(self, points: Tensor) -> Tensor:
        """log C(κ_j) − κ_j|x − s_j|²/2, ``(B, p, n)`` for ``points`` (B, p, 3)."""
        chord2 = _pairwise_chord(points, self.samples).square_()
        return torch.addcmul(self.log_c[:, None, :], chord2, self.kappa[:, None, :], value=-0.5)

    def log_density(self, points: Tensor) -> Tensor:
        """Log density per steradian ``(B, m)`` at ``points`` (B, m, 3), chunked."""
        out = torch.empty(points.shape[:2], dtype=points.dtype, device=points.device)
        for sl in _row_chunks(points.shape[1], points.shape[0], self.samples.shape[1]):
            out[:, sl] = torch.logsumexp(self._log_kernels(points[:, sl]), dim=-1)
        return out - math.log(self.samples.shape[1])

    def step(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """The mean-shift target ∇f/|∇f| and the log density, at ``points`` (B, p, 3), chunked.

        ∇f(x) ∝ Σ_j C(κ_j) κ_j exp(κ_j x·s_j) s_j: the kernel values, shifted by their row maximum (the common
        factor cancels in the normalisation), times the precomputed κ_j·s_j, so one exponential serves both.
        """
        target = torch.empty_like(points)
        log_f = torch.empty(points.shape[:2], dtype=points.dtype, device=points.device)
        scaled = self.samples * self.kappa.unsqueeze(-1)
        for sl in _row_chunks(points.shape[1], points.shape[0], self.samples.shape[1]):
            lk = self._log_kernels(points[:, sl])
            top = lk.amax(dim=-1, keepdim=True)
            k = lk.sub_(top).exp_()
            log_f[:, sl] = top[..., 0] + k.sum(dim=-1).log()
            pull = torch.bmm(k, scaled)
            # Perfectly balanced pulls (antipodal samples) have no direction: stay put.
            norm = pull.norm(dim=-1, keepdim=True)
            target[:, sl] = torch.where(norm > 1e-30, pull / norm.clamp_min(1e-30), points[:, sl])
        return target, log_f - math.log(self.samples.shape[1])


def _per_sample(value: float | Tensor, x: Tensor) -> Tensor:
    """A bandwidth given as a scalar, per item (B,) or per sample (B, n), as a validated (B, n) tensor."""
    b, n, _ = x.shape
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device).detach()
    if v.dim() == 1 and v.shape[0] == b:
        v = v[:, None]
    if v.dim() == 1 or v.dim() > 2 or (v.dim() == 2 and v.shape not in ((b, n), (b, 1))):
        raise ConfigError(
            f"bandwidth_km: expected a number, {b} values (one per item) or a ({b}, {n}) "
            f"tensor (one per sample), got shape {tuple(v.shape)}"
        )
    if not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
        raise ConfigError("bandwidth_km: bandwidths must be positive and finite")
    return v.expand(b, n).clone()


def kde_log_density(points: Tensor, samples: Tensor, bandwidth_km: float | Tensor | None = None) -> Tensor:
    """Log density per steradian ``(B, m)`` at ``points`` (B, m, 3) of the samples' vMF kernel density
    estimate (see :class:`_Kde`); integrates to 1 over the sphere.

    ``bandwidth_km``: a number, one per item (B,), or one per sample (B, n); default
    :func:`kde_bandwidth_km`.
    """
    p = _check_samples(points, "points")
    x = _check_samples(samples)
    if p.shape[0] != x.shape[0]:
        raise InputError(f"points: batch size {p.shape[0]} does not match samples' {x.shape[0]}")
    with torch.no_grad():
        out = _Kde.build(x, bandwidth_km).log_density(p)
    return out.to(samples.dtype)


def mean_shift(
    points: Tensor,
    samples: Tensor,
    bandwidth_km: float | Tensor | None = None,
    max_iter: int = 1000,
    tol_km: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Move ``points`` (B, m, 3) uphill on the samples' vMF KDE until each settles on a mode.

    The vMF mean-shift update is x ← ∇f(x)/|∇f(x)|: because each exp(κ_j x·s_j) is convex in x, f(x') ≥
    f(x) + ∇f(x)·(x' − x), and the unit vector maximising that bound is the update, so every step climbs the
    KDE. Plain mean-shift crawls near a mode (each step shrinks the distance only by σ²/(σ² + h²), ~0.9 for
    Scott's bandwidth), so steps are over-relaxed: stretched by λ (doubled after each accepted step; the
    stretched step is at most one bandwidth longer than the plain one). A stretched point is kept only if
    its density is not below that of the point it came from and its own step still points forward (an
    overshoot past the mode points back; this test stays exact near the mode, where density differences drop
    below float resolution); otherwise it is replaced by the plain step from the point it came from, and λ
    is quartered. The density never decreases (up to rounding), and the points reach the same modes as plain
    mean-shift in a fraction of the iterations.

    A point stops once its plain step is below ``tol_km`` (default 1e-4 of the item's median bandwidth,
    floored at the dtype's resolution); settled points leave the work, so the cost follows the slow points,
    not the batch. ``bandwidth_km``: as in :func:`kde_log_density`. Returns ``(points, converged)``, with
    ``converged`` (B, m) bool False only for points still moving after ``max_iter`` iterations.
    """
    p = _check_samples(points, "points")
    x = _check_samples(samples)
    if p.shape[0] != x.shape[0]:
        raise InputError(f"points: batch size {p.shape[0]} does not match samples' {x.shape[0]}")
    if max_iter < 1:
        raise ConfigError(f"mean_shift: max_iter must be >= 1, got {max_iter}")
    with torch.no_grad():
        kde = _Kde.build(x, bandwidth_km)
        tol = _per_item(tol_km, x, "tol_km")
        tol = _MODE_TOL * kde.scale if tol is None else tol / EARTH_RADIUS_KM
        pos, done = _mean_shift(p, kde, tol, max_iter)
    return pos.to(points.dtype), done


def _mean_shift(pos: Tensor, kde: _Kde, tol: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    """The loop of :func:`mean_shift` on validated tensors; ``tol`` (B,) in radians."""
    b, m, _ = pos.shape
    tol = tol.clamp_min(16.0 * torch.finfo(pos.dtype).eps)
    state = {
        "pos": pos.clone(),  # the point evaluated next
        "origin": pos.clone(),  # the last accepted point
        "back": pos.clone(),  # the plain step from the last accepted point: the fallback on rejection
        "best": torch.full((b, m), -math.inf, dtype=pos.dtype, device=pos.device),  # log density there
        "stretch": torch.ones((b, m), dtype=pos.dtype, device=pos.device),
        "forced": torch.zeros((b, m), dtype=torch.bool, device=pos.device),  # pos is a fallback: accept it
    }
    active = torch.ones((b, m), dtype=torch.bool, device=pos.device)
    for _ in range(max_iter):
        items = active.any(dim=1).nonzero().flatten()
        if items.numel() == 0:
            break
        act = active[items]
        width = int(act.sum(dim=1).max())
        # Put each item's moving points first, then work on the first `width` columns only.
        order = torch.sort((~act).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        moving = act.gather(1, order)
        s = {key: _take(val[items], order) for key, val in state.items()}
        sub = kde.select(items)
        target, log_f = sub.step(s["pos"])
        v = logmap(s["pos"], target)
        forward = (v * (s["pos"] - s["origin"])).sum(dim=-1) >= 0
        accept = s["forced"] | ((log_f >= s["best"]) & forward)
        plain = v.norm(dim=-1)
        settled = accept & (plain <= tol[items, None])
        length = torch.minimum(s["stretch"] * plain, plain + sub.scale[:, None])
        stretched = expmap(s["pos"], v * (length / plain.clamp_min(1e-30)).unsqueeze(-1))
        new = {
            "pos": torch.where(
                settled.unsqueeze(-1), target, torch.where(accept.unsqueeze(-1), stretched, s["back"])
            ),
            "origin": torch.where(accept.unsqueeze(-1), s["pos"], s["origin"]),
            "back": torch.where(accept.unsqueeze(-1), target, s["back"]),
            "best": torch.where(accept, log_f, s["best"]),
            "stretch": torch.where(
                accept, (2.0 * s["stretch"]).clamp_max(_MAX_STRETCH), (0.25 * s["stretch"]).clamp_min(1.0)
            ),
            "forced": ~accept,
        }
        for key, val in new.items():
            keep = moving.unsqueeze(-1) if val.dim() == 3 else moving
            state[key][items] = _put(state[key][items], order, torch.where(keep, val, s[key]))
        active[items] = act.scatter(1, order, moving & ~settled)
    return state["pos"], ~active


def _take(v: Tensor, idx: Tensor) -> Tensor:
    """``v[b, idx[b, j]]`` for (B, m) or (B, m, 3) tensors."""
    return _gather_points(v, idx) if v.dim() == 3 else v.gather(1, idx)


def _put(v: Tensor, idx: Tensor, val: Tensor) -> Tensor:
    """Out-of-place ``v[b, idx[b, j]] = val[b, j]`` for (B, m) or (B, m, 3) tensors."""
    if v.dim() == 3:
        return v.scatter(1, idx.unsqueeze(-1).expand(*idx.shape, 3), val)
    return v.scatter(1, idx, val)


def density_mode(
    samples: Tensor,
    log_prob: Tensor | None = None,
    bandwidth_km: float | Tensor | None = None,
    log_prob_fn: LogProbFn | None = None,
    starts: int = _MODE_STARTS,
) -> Tensor:
    """The highest mode ``(B, 3)`` of the samples' vMF kernel density estimate.

    Mean-shift (:func:`mean_shift`) from the ``starts`` samples with the highest density — by ``log_prob``
    (B, n), the model's exact log density at the samples, when given, else by the KDE evaluated at up to 256
    samples — to 1e-4 bandwidths. Among the converged points the one with the highest density wins: the
    model's (``log_prob_fn``, called once on ``(B, starts, 3)``) when given, since the KDE flattens peaks
    narrower than its bandwidth, else the KDE's. ``bandwidth_km``: as in :func:`kde_log_density`.
    """
    if starts < 1:
        raise ConfigError(f"density_mode: starts must be >= 1, got {starts}")
    x = _check_samples(samples)
    with torch.no_grad():
        kde = _Kde.build(x, bandwidth_km)
        if log_prob is not None:
            if not isinstance(log_prob, Tensor) or log_prob.shape != x.shape[:2]:
                got = tuple(log_prob.shape) if isinstance(log_prob, Tensor) else type(log_prob).__name__
                raise InputError(f"log_prob: expected shape {tuple(x.shape[:2])}, got {got}")
            pool = x
            score = torch.nan_to_num(log_prob.detach().to(x.device, x.dtype), nan=-math.inf)
        else:
            pool = _strided(x, _MODE_POOL)
            score = kde.log_density(pool)
        top = score.topk(min(starts, pool.shape[1]), dim=1).indices
        modes, _ = _mean_shift(_gather_points(pool, top), kde, _MODE_TOL * kde.scale, 1000)
    if log_prob_fn is not None:
        dens = log_prob_fn(modes.to(samples.dtype)).detach().to(x.device, x.dtype)
        if dens.shape != modes.shape[:2]:
            raise InputError(
                f"log_prob_fn: returned shape {tuple(dens.shape)}, expected {tuple(modes.shape[:2])}"
            )
        dens = torch.nan_to_num(dens, nan=-math.inf)
    else:
        with torch.no_grad():
            dens = kde.log_density(modes)
    return _gather_points(modes, dens.argmax(dim=1, keepdim=True))[:, 0].to(samples.dtype)


# ------------------------------------------------------------------------------------------- top-k


@dataclass(frozen=True)
class TopK:
    """The k most probable distinct locations per item, sorted by mass (largest first).

    - ``xyz`` (B, k, 3) / ``latlon`` (B, k, 2) degrees: the modes; NaN where ``valid`` is False.
    - ``mass`` (B, k): fraction of samples in each mode's basin (0 where invalid).
    - ``valid`` (B, k) bool: False pads items with fewer than k modes.
    - ``other_mass`` (B,): the rest (smaller modes), so ``mass.sum(1) + other_mass == 1``.
    - ``log_density`` (B, k): the KDE's log density per steradian at each mode (−inf where invalid).
    - ``bandwidth_km`` (B, k): the KDE bandwidth at each mode (that of its nearest sample; NaN where invalid),
      a rough resolution of the mode's location.
    - ``assignment`` (B, n) long: index in 0..k−1 of each sample's mode, −1 for "other".
    """

    xyz: Tensor
    latlon: Tensor
    mass: Tensor
    valid: Tensor
    other_mass: Tensor
    log_density: Tensor
    bandwidth_km: Tensor
    assignment: Tensor


def _local_bandwidth_km(points: Tensor, kde: _Kde) -> Tensor:
    """The bandwidth of the sample nearest to each of ``points`` (B, p, 3): ``(B, p)`` km."""
    nearest = _pairwise_chord(points, kde.samples).argmin(dim=-1)
    return kde.bandwidth_km.gather(1, nearest)


def _greedy_merge(pos: Tensor, dens: Tensor, kde: _Kde, sep_km: Tensor | None) -> tuple[Tensor, Tensor]:
    """Cluster converged points: the densest unlabelled point opens a cluster that takes every unlabelled
    point within the separation radius (``sep_km``, default twice the local bandwidth; never below half of
    it). Returns ``(labels (B, n), centres (B, J, 3))``; one pass per cluster of the item with the most
    clusters, each O(B·n)."""
    b, n, _ = pos.shape
    labels = torch.full((b, n), -1, dtype=torch.long, device=pos.device)
    centres = []
    for j in range(n):
        free = labels < 0
        if not bool(free.any()):
            break
        pick = torch.where(free, dens, torch.full_like(dens, -math.inf)).argmax(dim=1, keepdim=True)
        centre = _gather_points(pos, pick)  # (B, 1, 3)
        h_loc = _local_bandwidth_km(centre, kde)[:, 0]
        sep = 2.0 * h_loc if sep_km is None else sep_km
        radius = torch.maximum(sep, 0.5 * h_loc) / EARTH_RADIUS_KM
        near = angle(centre, pos) <= radius[:, None]
        labels = torch.where(free & near & free.any(dim=1, keepdim=True), j, labels)
        centres.append(centre)
    return labels, torch.cat(centres, dim=1)


def top_k_modes(
    samples: Tensor,
    k: int = 5,
    bandwidth_km: float | Tensor | None = None,
    min_separation_km: float | Tensor | None = None,
    max_iter: int = 300,
) -> TopK:
    """The ``k`` heaviest distinct modes of the samples' distribution and their probability mass.

    Every sample climbs the vMF KDE by mean-shift (to 1e-2 bandwidths, enough to tell basins apart). Then,
    densest first, each converged point that is not yet taken opens a mode and takes the points within
    ``min_separation_km`` of it (a number or one per item; default twice the local bandwidth, about as close
    as two KDE modes can be and stay distinct; never below half of it), so closer modes merge into the denser
    one. A mode's mass is the fraction of samples in its basin; modes past the k-th are summed into
    ``other_mass``. The kept modes are then located to 1e-4 bandwidths. ``bandwidth_km``: as in
    :func:`kde_log_density`. See :class:`TopK` for the fields.

    Every sample is counted exactly once, in one mode's mass or in ``other_mass``, so
    ``mass.sum(1) + other_mass == 1``; ``assignment`` says which.

    When are two groups two modes? Two vMF groups of per-axis spread σ (≈ R/√κ) whose centres are D apart
    are reported separately when (1) the KDE has two maxima, i.e. D ≳ 2·√(σ² + h²) with h the bandwidth
    there (:func:`kde_bandwidth_km`; the mixture itself is unimodal below D = 2σ, so closer groups are
    honestly one mode), and (2) D exceeds the merge radius (``min_separation_km``, default 2h). Otherwise
    they are one mode carrying both masses. Bandwidths never exceed :data:`MAX_BANDWIDTH_KM`, so groups
    more than ~3,000 km apart are always kept apart by the default rule.
    """
    if k < 1:
        raise ConfigError(f"top_k_modes: k must be >= 1, got {k}")
    x = _check_samples(samples)
    b, n, _ = x.shape
    sep = _per_item(min_separation_km, x, "min_separation_km")
    if b == 0:
        z = samples.detach().new_zeros
        return TopK(
            z((0, k, 3)),
            z((0, k, 2)),
            z((0, k)),
            z((0, k), dtype=torch.bool),
            z(0),
            z((0, k)),
            z((0, k)),
            z((0, n), dtype=torch.long),
        )
    with torch.no_grad():
        kde = _Kde.build(x, bandwidth_km)
        pos, _ = _mean_shift(x, kde, _BASIN_TOL * kde.scale, max_iter)
        labels, centres = _greedy_merge(pos, kde.log_density(pos), kde, sep)
        n_clusters = centres.shape[1]
        counts = torch.zeros((b, n_clusters), dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, labels, torch.ones_like(x[..., 0]))
        kk = min(k, n_clusters)
        # Sort by mass; ties go to the earlier (denser) cluster through an offset below one sample.
        order_key = counts - torch.arange(n_clusters, device=x.device, dtype=x.dtype) * (0.5 / n_clusters)
        top = order_key.topk(kk, dim=1).indices  # (B, kk)
        mass = counts.gather(1, top) / n
        valid = mass > 0
        located, _ = _mean_shift(_gather_points(centres, top), kde, _MODE_TOL * kde.scale, 1000)
        log_density = kde.log_density(located)
        h_mode = _local_bandwidth_km(located, kde)
        # Sample → rank of its mode among the kept ones (−1 for "other").
        rank_of = torch.full((b, n_clusters), -1, dtype=torch.long, device=x.device)
        rank_of.scatter_(1, top, torch.arange(kk, device=x.device).expand(b, kk))
        assignment = torch.where(counts > 0, rank_of, -1).gather(1, labels)
        other = (1.0 - mass.sum(dim=1)).clamp_min(0.0)
        pad = k - kk
        if pad:
            valid = torch.cat([valid, valid.new_zeros((b, pad))], dim=1)
            mass = torch.cat([mass, mass.new_zeros((b, pad))], dim=1)
            located = torch.cat([located, located.new_zeros((b, pad, 3))], dim=1)
            log_density = torch.cat([log_density, log_density.new_zeros((b, pad))], dim=1)
            h_mode = torch.cat([h_mode, h_mode.new_zeros((b, pad))], dim=1)
        xyz = torch.where(valid.unsqueeze(-1), located, math.nan)
        log_density = torch.where(valid, log_density, -math.inf)
        h_mode = torch.where(valid, h_mode, math.nan)
    dt = samples.dtype
    return TopK(
        xyz=xyz.to(dt),
        latlon=xyz_to_latlon(xyz).to(dt),
        mass=mass.to(dt),
        valid=valid,
        other_mass=other.to(dt),
        log_density=log_density.to(dt),
        bandwidth_km=h_mode.to(dt),
        assignment=assignment,
    )


def basin_of(
    points: Tensor,
    samples: Tensor,
    top: TopK,
    bandwidth_km: float | Tensor | None = None,
    max_iter: int = 300,
) -> Tensor:
    """Which of ``top``'s modes each of ``points`` (B, m, 3) belongs to: ``(B, m)`` rank, −1 for none.

    The point climbs the same KDE as :func:`top_k_modes` (pass the same ``bandwidth_km``) to where its
    basin's samples went, and takes the rank of the nearest kept mode if it lands within twice that mode's
    bandwidth (the default merge radius); −1 means the point's basin is not among the top k (its mass is
    in ``other_mass``). Use it to check that a point estimate agrees with the reported modes — e.g. a
    GeoScore-optimal point between two modes is in neither — and label it for what it is.
    """
    p = _check_samples(points, "points")
    x = _check_samples(samples)
    if p.shape[0] != x.shape[0] or top.xyz.shape[0] != x.shape[0]:
        raise InputError(
            f"points / top: batch sizes {p.shape[0]} / {top.xyz.shape[0]} do not match the "
            f"samples' {x.shape[0]}"
        )
    if x.shape[0] == 0:
        return torch.zeros(p.shape[:2], dtype=torch.long, device=x.device)
    with torch.no_grad():
        kde = _Kde.build(x, bandwidth_km)
        pos, _ = _mean_shift(p, kde, _BASIN_TOL * kde.scale, max_iter)
        modes = torch.nan_to_num(top.xyz.detach().to(x.device, x.dtype))
        valid = top.valid.to(x.device)
        dist = _chord_to_angle(_pairwise_chord(pos, modes)) * EARTH_RADIUS_KM  # (B, m, k) km
        dist = torch.where(valid[:, None, :], dist, math.inf)
        near, rank = dist.min(dim=-1)
        h = torch.nan_to_num(top.bandwidth_km.detach().to(x.device, x.dtype), nan=0.0).gather(1, rank)
        return torch.where(near <= 2.0 * h, rank, -1)


# ---------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Estimator:
    """A named point estimate: ``estimator(samples (B, n, 3), log_prob (B, n) | None) -> (B, 3)``.

    ``log_prob`` says whether the exact model log densities at the samples are ``"required"`` (the caller
    must compute them: one likelihood solve per sample), ``"optional"`` (used when given) or ``"unused"``.
    ``optimal_for`` names the metric the estimate targets.
    """

    name: str
    fn: Callable[[Tensor, Tensor | None], Tensor]
    log_prob: Literal["unused", "optional", "required"]
    optimal_for: str

    def __call__(self, samples: Tensor, log_prob: Tensor | None = None) -> Tensor:
        if self.log_prob == "required" and log_prob is None:
            raise ConfigError(
                f"estimator {self.name!r} needs the log densities of the samples; pass "
                "log_prob (B, n) or choose 'mean', 'median', 'geoscore' or 'mode'"
            )
        return self.fn(samples, log_prob)


def _mean(samples: Tensor, log_prob: Tensor | None) -> Tensor:
    return point_mean_direction(samples)


def _median(samples: Tensor, log_prob: Tensor | None) -> Tensor:
    return geodesic_median(samples)


def _geoscore(samples: Tensor, log_prob: Tensor | None) -> Tensor:
    return max_expected_geoscore(samples)


def _mode(samples: Tensor, log_prob: Tensor | None) -> Tensor:
    return density_mode(samples, log_prob=log_prob)


def _best(samples: Tensor, log_prob: Tensor | None) -> Tensor:
    assert log_prob is not None  # Estimator.__call__ checked it
    return best_by_likelihood(samples, log_prob)


ESTIMATORS: dict[str, Estimator] = {
    "mean": Estimator("mean", _mean, "unused", "mean squared chord distance (a cheap baseline)"),
    "median": Estimator("median", _median, "unused", "mean great-circle distance (mean km error)"),
    "geoscore": Estimator("geoscore", _geoscore, "unused", "expected GeoScore"),
    "mode": Estimator("mode", _mode, "optional", "accuracy within small radii (the most probable point)"),
    "best-of-n": Estimator(
        "best-of-n", _best, "required", "the most likely of the samples (docs/reference-behaviour.md §8.2)"
    ),
}
"""Point estimates by name. The paper's default, one guided sample, is the sampler's job, not listed here."""
