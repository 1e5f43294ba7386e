"""Density maps: a model's exact predicted density for one item on an adaptive H3 grid, and its PNG/HTML map.

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

Normalisation. Σ p·area is the quadrature of a density that integrates to 1, so its distance from 1 measures
both the grid (an unresolved mode) and the likelihood ODE (too few solver steps bias every log-density by
about the same amount). A map whose mass is off by more than ``mass_tolerance`` is recomputed with twice the
solver steps, up to ``max_steps`` (ODE families only; a vMF's density is closed-form): the map a user sees
integrates to 1 within 1% or says by how much it does not (``DensityMap.mass_error``).

Regions. :func:`highest_density_regions` gives the smallest sets of cells that hold 50% / 90% of the mass
(densest first), their areas in km² and their outlines (H3's ``cells_to_h3shape``).

Drawing lives in :mod:`geoloc.maps` (matplotlib / Leaflet); this module is the algorithm only.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from geoloc.config import DensityConfig, LikelihoodConfig
from geoloc.errors import ConfigError
from geoloc.sphere import EARTH_RADIUS_KM, haversine_km

__all__ = ["DensityConfig", "DensityMap", "Region", "density_map", "density_maps", "highest_density_regions"]

_MAX_H3_RES = 15
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
    def mass_error(self) -> float:
        """|Σ p·area − 1|: how far the map is from a normalised density (grid and ODE error together)."""
        return abs(self.total_mass - 1.0)

    @property
    def likelihood_steps(self) -> int | None:
        """ODE solver steps behind the log-densities (None: closed form or an adaptive solver)."""
        return self.meta.get("likelihood_steps")

    @property
    def density_km2(self) -> np.ndarray:
        """Density per km² of the Earth's surface (R = 6371 km)."""
        return np.exp(self.log_density) / EARTH_RADIUS_KM**2

    @property
    def localizability_bits(self) -> float:
        """E_p[log₂ p] from the map (bits, per steradian): negative entropy the paper calls localizability."""
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
        return [
            {
                "lat": float(self.latlon[q, 0]),
                "lon": float(self.latlon[q, 1]),
                "log_density": float(ld[q]),
                "mass": total[q],
            }
            for q in kept[:k]
        ]


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
    chosen = [cells[i] for i in np.flatnonzero(want)[np.argsort(-error[want], kind="stable")]][
        : cfg.max_refine
    ]
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
    are refined; otherwise ``config.seed_samples`` unguided draws are made per item. Maps whose mass is off
    by more than ``config.mass_tolerance`` are recomputed with twice the ODE steps (module docstring).

    Example::

        geo = Geolocator.from_pretrained("runs/demo")
        (m,) = density_maps(geo, emb[:1])
        m.total_mass, m.peaks(3)       # ≈ 1.0, the three densest places
        geoloc.maps.render_png(m, "map.png", title="Springfield")
    """
    import torch

    from geoloc.families import OdeFamily, check_cond

    t0 = time.perf_counter()
    cond = torch.as_tensor(cond, dtype=torch.float32).to(geo.device)
    cond = cond.unsqueeze(0) if cond.dim() == 1 else cond
    check_cond(cond, geo.cond_dim)
    b = cond.shape[0]
    lik = config.likelihood or geo.likelihood_config
    if seeds is None and config.seed_samples > 0:
        seeds = geo.sample(cond, config.seed_samples, omega=0.0, generator=generator)
    if seeds is not None:
        seeds = torch.as_tensor(seeds)
        if seeds.dim() != 3 or seeds.shape[0] != b or seeds.shape[-1] != 3:
            raise ConfigError(f"seeds: expected (B={b}, n, 3) unit vectors, got {tuple(seeds.shape)}")
    ode = isinstance(geo.family, OdeFamily) and lik.method != "dopri5"
    maps = _adaptive_maps(geo, cond, seeds, config, lik)
    spent = [m.evaluations for m in maps]
    while ode and 2 * lik.steps <= config.max_steps:
        redo = [i for i, m in enumerate(maps) if m.space == "sphere" and m.mass_error > config.mass_tolerance]
        if not redo:
            break
        lik = replace(lik, steps=2 * lik.steps)
        again = _adaptive_maps(geo, cond[redo], None if seeds is None else seeds[redo], config, lik)
        for i, m in zip(redo, again, strict=True):
            spent[i] += m.evaluations
            maps[i] = m
    elapsed = time.perf_counter() - t0
    for m, n in zip(maps, spent, strict=True):
        m.evaluations = n
        m.elapsed_s = elapsed / b
        if not ode:
            m.meta["likelihood_steps"] = None
    return maps


def _adaptive_maps(
    geo: Any, cond: Any, seeds: Any, config: DensityConfig, lik: LikelihoodConfig
) -> list[DensityMap]:
    """One pass of the adaptive refinement for every row of ``cond`` at the ODE settings ``lik``."""
    import h3

    from geoloc.sphere import xyz_to_latlon

    b = cond.shape[0]
    seed_cells = None
    if seeds is not None:
        finest = config.start_resolution + config.levels
        seed_cells = [
            [h3.latlng_to_cell(float(a), float(o), finest) for a, o in item]
            for item in xyz_to_latlon(seeds.double()).cpu().numpy()
        ]

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
        maps.append(
            DensityMap(
                cells=np.array(cells, dtype=str),
                resolution=np.array([_resolution(c) for c in cells], dtype=np.int8),
                latlon=np.array([t.centre[c] for c in cells], dtype=np.float64).reshape(-1, 2),
                area_sr=area_sr,
                log_density=ld,
                evaluations=evaluations[i],
                space="r3-restricted" if r3 else "sphere",
                log_normaliser=norm,
                meta={
                    "family": getattr(geo.family, "name", ""),
                    "config": config,
                    "likelihood_steps": lik.steps,
                },
            )
        )
    return maps


def density_map(geo: Any, cond: Any, config: DensityConfig = DensityConfig(), **kwargs: Any) -> DensityMap:
    """:func:`density_maps` for one item (``cond`` is ``(D,)`` or ``(1, D)``)."""
    return density_maps(geo, cond, config, **kwargs)[0]


# ------------------------------------------------------------------------------------------------ regions
_OUTLINE_MAX_CELLS = 30_000  # cells handed to cells_to_h3shape at most (it takes ~10 ms per 1,000)


@dataclass(frozen=True)
class Region:
    """A highest-density region: the densest cells of a map that together hold ``level`` of its mass.

    ``cells``: indexes into the map's arrays; ``mass``: their share of the map's mass (≥ ``level``, by at
    most one cell); ``area_km2``: their area; ``outline``: polygons, each a list of rings (``(k, 2)`` lat/lon
    degrees, the outer ring first, then holes), traced on H3 cells of resolution ``outline_resolution``.
    """

    level: float
    cells: np.ndarray
    mass: float
    area_km2: float
    outline: list[list[np.ndarray]]
    outline_resolution: int


def highest_density_regions(dmap: DensityMap, levels: Sequence[float] = (0.5, 0.9)) -> list[Region]:
    """The ``levels`` highest-density regions of ``dmap`` (one :class:`Region` per level, in that order).

    Cells are taken densest first (density, not mass: a region is where the density is above a threshold)
    until their mass reaches the level's share of the map's total. The outline is traced on one H3
    resolution, because ``cells_to_h3shape`` needs one: the region's finest resolution, or coarser when the
    coarse cells' descendants would exceed a budget; finer cells are replaced by their ancestor there.
    """
    import h3

    if any(not 0.0 < q <= 1.0 for q in levels):
        raise ConfigError(f"region levels must be in (0, 1], got {list(levels)}")
    mass = np.where(np.isfinite(dmap.log_density), dmap.mass, 0.0)
    total = float(mass.sum())
    order = np.argsort(-dmap.log_density, kind="stable")
    cum = np.cumsum(mass[order]) / (total if total > 0 else 1.0)
    regions = []
    for q in levels:
        n = min(int(np.searchsorted(cum, q - 1e-12)) + 1, len(order))
        idx = np.sort(order[:n])
        res = dmap.resolution[idx].astype(int)
        r = int(res.max()) if n else 0
        while r > int(res.min()) and np.sum(7.0 ** np.clip(r - res, 0, None)) > _OUTLINE_MAX_CELLS:
            r -= 1
        cells: set[str] = set()
        for c, rc in zip(dmap.cells[idx].tolist(), res.tolist(), strict=True):
            if rc > r:
                cells.add(h3.cell_to_parent(c, r))
            elif rc < r:
                cells.update(h3.cell_to_children(c, r))
            else:
                cells.add(c)
        outline = []
        if cells:
            shape = h3.cells_to_h3shape(list(cells), tight=False)
            for poly in shape.polys:
                rings = [np.asarray(poly.outer, dtype=np.float64)]
                rings += [np.asarray(h, dtype=np.float64) for h in poly.holes]
                outline.append(rings)
        regions.append(
            Region(
                level=float(q),
                cells=idx,
                mass=float(mass[idx].sum() / total) if total > 0 else 0.0,
                area_km2=float(dmap.area_sr[idx].sum() * EARTH_RADIUS_KM**2),
                outline=outline,
                outline_resolution=r,
            )
        )
    return regions


# ------------------------------------------------------------------------------------------------ geometry
def _clip_lon(ring: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Sutherland–Hodgman clip of a (k, 2) lon/lat ring to lo ≤ lon ≤ hi (convex or band-shaped rings)."""
    for bound, keep in ((lo, lambda x: x >= lo), (hi, lambda x: x <= hi)):
        if len(ring) == 0:
            break
        out = []
        prev = ring[-1]
        for cur in ring:
            if keep(cur[0]):
                if not keep(prev[0]):
                    t = (bound - prev[0]) / (cur[0] - prev[0])
                    out.append([bound, prev[1] + t * (cur[1] - prev[1])])
                out.append(cur)
            elif keep(prev[0]):
                t = (bound - prev[0]) / (cur[0] - prev[0])
                out.append([bound, prev[1] + t * (cur[1] - prev[1])])
            prev = cur
        ring = np.asarray(out, dtype=np.float64).reshape(-1, 2)
    return ring


def cell_rings(cell: str, scale: float = 1.0) -> list[np.ndarray]:
    """The boundary of H3 ``cell`` as (k, 2) lon/lat rings inside [-180, 180] × [-90, 90] (not closed).

    A cell across the antimeridian is cut there into two rings (as RFC 7946 asks of GeoJSON); a cell around a
    pole becomes a band closed along the pole's latitude. ``scale`` > 1 enlarges the ring about its centre
    (drawing uses it to hide the slivers where H3 cells of different resolutions meet).
    """
    import h3

    ring = np.array(h3.cell_to_boundary(cell), dtype=np.float64)  # (k, 2) lat, lon
    lat, lon = ring[:, 0], ring[:, 1].copy()
    steps = (np.diff(np.append(lon, lon[0])) + 180.0) % 360.0 - 180.0
    lon = lon[0] + np.concatenate([[0.0], np.cumsum(steps[:-1])])  # continuous longitudes
    if abs(steps.sum()) > 180.0:  # winds around a pole: close the band along lat = ±90
        pole = 90.0 if lat.mean() > 0 else -90.0
        end = lon[-1] + steps[-1]
        xs = np.concatenate([lon, [end, end, lon[0]]])
        ys = np.concatenate([lat, [lat[0], pole, pole]])
    else:
        cx, cy = lon.mean(), lat.mean()
        xs, ys = cx + (lon - cx) * scale, np.clip(cy + (lat - cy) * scale, -90.0, 90.0)
    full = np.column_stack([xs, ys])
    out = []
    for shift in (-360.0, 0.0, 360.0):
        part = full + np.array([shift, 0.0])
        if part[:, 0].max() > -180.0 and part[:, 0].min() < 180.0:
            clipped = _clip_lon(part, -180.0, 180.0)
            if len(clipped) >= 3:
                out.append(clipped)
    return out
