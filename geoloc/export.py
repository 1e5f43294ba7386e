"""Predictions → files and text: CSV / Parquet rows, a GeoJSON FeatureCollection, and a plain terminal table.

One flat row per input (``prediction_rows``) so that a spreadsheet, pandas or DuckDB reads the results
without knowing geoloc: the estimate, then ``mode1_*`` … ``modeK_*`` for the top-k locations, the nearest
place names, localizability, the ground truth and error when known, and ``error`` for inputs that failed.
GeoJSON (RFC 7946: coordinates are ``[lon, lat]``) has a Point per estimate and one per mode, with the mass
as a property, so any GIS or web map shows the answer and its alternatives. A density map's cells
(:class:`~geoloc.density.DensityMap`) export as a GeoJSON of H3 hexagons or as a Parquet table, one row per
cell, with the highest-density region each cell belongs to. All writes are atomic.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geoloc.density import DensityMap, Region, cell_rings, highest_density_regions
from geoloc.errors import ConfigError
from geoloc.files import atomic_write
from geoloc.sphere import EARTH_RADIUS_KM

__all__ = [
    "density_features",
    "density_rows",
    "format_table",
    "prediction_rows",
    "to_geojson",
    "write_density",
    "write_geojson",
    "write_table",
]

_ROUND = 6  # decimals of degrees in files: ~0.1 m


def _r(x: float | None, nd: int = _ROUND) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def _place_cols(prefix: str, place: Any) -> dict[str, Any]:
    if place is None:
        return {f"{prefix}": None, f"{prefix}_cc": None, f"{prefix}_km": None}
    return {f"{prefix}": place.label, f"{prefix}_cc": place.cc, f"{prefix}_km": _r(place.distance_km, 1)}


def _levels(predictions: Sequence[Any]) -> list[float]:
    """The region levels any prediction carries, ascending (one column each, in every row)."""
    return sorted({float(a) for p in predictions for a in (getattr(p, "region_km2", None) or {})})


def _region_cols(p: Any, levels: Sequence[float]) -> dict[str, Any]:
    """``region50_km2``, ``region90_km2``, ...: the area of each highest-density region (None: uncomputed)."""
    areas = getattr(p, "region_km2", None) or {}
    return {f"region{100 * a:g}_km2": _r(areas.get(a), 1) for a in levels}


def prediction_rows(predictions: Sequence[Any], top_k: int | None = None) -> list[dict[str, Any]]:
    """One dict per :class:`~geoloc.predict.ItemPrediction`, with the same columns in every row.

    Columns: ``id, input, kind, lat, lon, estimator, query, estimate_kind, estimate_mode, estimate_label,
    place, place_cc, place_km, localizability_bits``, then for i in 1..k ``mode{i}_lat, mode{i}_lon,
    mode{i}_mass, mode{i}_place``, ``other_mass``, ``true_lat, true_lon, error_km``, ``error``. ``query``: the
    text of a text input; ``estimate_mode``: the i of the mode holding the estimate, −1 for none of them
    (see :class:`~geoloc.predict.ItemPrediction`). ``region50_km2, region90_km2``: the areas of the
    highest-density regions, when computed. ``top_k`` fixes k (default: the most modes any row has).
    """
    k = top_k if top_k is not None else max((len(p.modes) for p in predictions), default=0)
    levels = _levels(predictions)
    rows = []
    for p in predictions:
        row: dict[str, Any] = {
            "id": p.id,
            "input": p.input,
            "kind": p.kind,
            "lat": _r(p.lat),
            "lon": _r(p.lon),
            "estimator": p.estimator or None,
            "query": getattr(p, "query", "") or p.input,
            "estimate_kind": getattr(p, "estimate_kind", "") or None,
            "estimate_mode": getattr(p, "estimate_mode", None),
            "estimate_label": getattr(p, "estimate_label", "") or None,
            **_place_cols("place", p.place),
            "localizability_bits": _r(p.localizability_bits, 4),
            **_region_cols(p, levels),
        }
        for i in range(k):
            m = p.modes[i] if i < len(p.modes) else None
            row[f"mode{i + 1}_lat"] = None if m is None else _r(m.lat)
            row[f"mode{i + 1}_lon"] = None if m is None else _r(m.lon)
            row[f"mode{i + 1}_mass"] = None if m is None else _r(m.mass, 4)
            row[f"mode{i + 1}_place"] = None if m is None or m.place is None else m.place.label
        row.update(
            {
                "other_mass": _r(p.other_mass, 4),
                "true_lat": _r(p.true_lat),
                "true_lon": _r(p.true_lon),
                "error_km": _r(p.error_km, 3),
                "error": p.error,
            }
        )
        rows.append(row)
    return rows


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(rows[0]) if rows else ["id"]
    columns = {n: [r.get(n) for r in rows] for n in names}
    types = {}
    for n, vals in columns.items():
        present = [v for v in vals if v is not None]
        types[n] = (
            pa.float64() if present and all(isinstance(v, (int, float)) for v in present) else pa.string()
        )
    table = pa.table({n: pa.array(v, type=types[n]) for n, v in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    names = list(rows[0]) if rows else ["id"]
    w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue().encode("utf-8")


def write_table(predictions: Sequence[Any], path: str | Path, top_k: int | None = None) -> Path:
    """Write :func:`prediction_rows` as ``.csv`` or ``.parquet`` (by the suffix), atomically."""
    path = Path(path)
    rows = prediction_rows(predictions, top_k)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        data = _csv_bytes(rows)
    elif suffix in (".parquet", ".pq"):
        data = _parquet_bytes(rows)
    else:
        raise ConfigError(f"{path}: unknown table format {suffix or '(none)'}; use .csv or .parquet")
    atomic_write(path, lambda p: Path(p).write_bytes(data))
    return path


def to_geojson(predictions: Sequence[Any]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection: per input, a Point for the estimate (``role: "estimate"``) and one per
    top-k mode (``role: "mode"``, ``rank``, ``mass``); inputs that failed get a Feature with a null geometry,
    ``role: "failed"`` and their ``error`` (RFC 7946 §3.2). Coordinates are ``[lon, lat]`` degrees."""
    features: list[dict[str, Any]] = []
    levels = _levels(predictions)
    for p in predictions:
        base = {"id": p.id, "query": getattr(p, "query", "") or p.input, "input": p.input}
        if not p.ok or p.lat is None:
            features.append(
                {
                    "type": "Feature",
                    "geometry": None,
                    "properties": {**base, "role": "failed", "error": p.error},
                }
            )
            continue
        props: dict[str, Any] = {
            **base,
            "role": "estimate",
            "estimator": p.estimator,
            "estimate_kind": getattr(p, "estimate_kind", "") or None,
            "estimate_mode": getattr(p, "estimate_mode", None),
            "estimate_label": getattr(p, "estimate_label", "") or None,
            "place": None if p.place is None else p.place.label,
            "localizability_bits": _r(p.localizability_bits, 4),
            **_region_cols(p, levels),
        }
        if p.true_lat is not None:
            props.update(
                {"true_lat": _r(p.true_lat), "true_lon": _r(p.true_lon), "error_km": _r(p.error_km, 3)}
            )
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [_r(p.lon), _r(p.lat)]},
                "properties": props,
            }
        )
        for rank, m in enumerate(p.modes, start=1):
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [_r(m.lon), _r(m.lat)]},
                    "properties": {
                        **base,
                        "role": "mode",
                        "rank": rank,
                        "mass": _r(m.mass, 4),
                        "place": None if m.place is None else m.place.label,
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(predictions: Sequence[Any], path: str | Path) -> Path:
    """Write :func:`to_geojson` to ``path`` atomically."""
    body = json.dumps(to_geojson(predictions), ensure_ascii=False, indent=1)
    path = Path(path)
    atomic_write(path, lambda p: Path(p).write_text(body, encoding="utf-8"))
    return path


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(predictions: Sequence[Any], top_k: int = 3, width: int = 30) -> str:
    """A plain-text table for the terminal (no colours, no box drawing): one line per input.

    Columns: id, the query when it is not the id (texts from a manifest), estimate (lat, lon), nearest place,
    which mode the estimate is in (``in mode #1``, ``outside the top-3 modes``; "guided sample" for a guided
    draw) when known, the top modes as ``mass place``, localizability (bits) when computed, and the error in
    km when the truth is known, and the areas of the highest-density regions (``50% km²``) when computed.
    Failed inputs show ``error: <reason>``.
    """

    def query(p: Any) -> str:  # the text of a text query whose id is not that text (manifest id, slug)
        q = getattr(p, "query", "") or ""
        return q if p.kind == "text" and q != p.id else ""

    show_query = any(query(p) for p in predictions)
    show_where = any(getattr(p, "estimate_label", "") for p in predictions if p.ok)
    show_loc = any(p.localizability_bits is not None for p in predictions)
    show_err = any(p.error_km is not None for p in predictions)
    header = ["id"] + ["query"] * show_query + ["estimate", "place"] + ["estimate is"] * show_where
    header += [f"#{i + 1}" for i in range(top_k)]
    levels = _levels(predictions)
    header += ["loc bits"] * show_loc + [f"{100 * a:g}% km²" for a in levels] + ["error km"] * show_err
    lines = []
    for p in predictions:
        head = [_cut(p.id, width)] + [_cut(query(p), width)] * show_query
        if not p.ok:
            lines.append([*head, f"error: {p.error}"])
            continue
        row = [*head, f"{p.lat:8.3f} {p.lon:9.3f}", _cut(p.place.label if p.place else "", width)]
        if show_where:
            row.append(p.estimate_label)
        for i in range(top_k):
            m = p.modes[i] if i < len(p.modes) else None
            row.append(
                ""
                if m is None
                else _cut(
                    f"{m.mass:4.0%} " + (m.place.label if m.place else f"{m.lat:.2f},{m.lon:.2f}"), width
                )
            )
        if show_loc:
            row.append("" if p.localizability_bits is None else f"{p.localizability_bits:.2f}")
        for a in levels:
            area = (getattr(p, "region_km2", None) or {}).get(a)
            row.append("" if area is None else f"{area:,.0f}")
        if show_err:
            row.append("" if p.error_km is None else f"{p.error_km:.0f}")
        lines.append(row)
    widths = [len(h) for h in header]
    for row in lines:
        if len(row) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in lines:
        if len(row) == len(header):
            out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        else:
            lead = len(row) - 1  # id (and query) columns, then the error message
            out.append(
                "  ".join([*(c.ljust(w) for c, w in zip(row[:lead], widths, strict=False)), *row[lead:]])
            )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ density
def density_rows(
    dmap: DensityMap, levels: Sequence[float] = (0.5, 0.9), regions: Sequence[Region] | None = None
) -> dict[str, np.ndarray]:
    """A density map's cells as columns: ``cell`` (H3 index), ``resolution``, ``lat``, ``lon`` (centre),
    ``area_km2``, ``density_km2``, ``mass`` (p·area), ``log_density`` (per steradian) and ``region``: the
    smallest of ``levels`` whose highest-density region holds the cell (NaN: none). ``regions``: those
    regions when already computed (:func:`~geoloc.density.highest_density_regions`)."""
    region = np.full(len(dmap), np.nan)
    regions = highest_density_regions(dmap, levels) if regions is None else regions
    for reg in sorted(regions, key=lambda r: -r.level):
        region[reg.cells] = reg.level
    return {
        "cell": dmap.cells.astype(str),
        "resolution": dmap.resolution.astype(np.int64),
        "lat": dmap.latlon[:, 0],
        "lon": dmap.latlon[:, 1],
        "area_km2": dmap.area_sr * EARTH_RADIUS_KM**2,
        "density_km2": dmap.density_km2,
        "mass": dmap.mass,
        "log_density": dmap.log_density,
        "region": region,
    }


def density_features(
    dmap: DensityMap, levels: Sequence[float] = (0.5, 0.9), regions: Sequence[Region] | None = None
) -> dict[str, Any]:
    """The cells as a GeoJSON FeatureCollection, in the map's order: a Polygon per cell (a MultiPolygon for
    one cut at the antimeridian, RFC 7946 §3.1.9), with the :func:`density_rows` columns as properties."""
    cols = density_rows(dmap, levels, regions)
    names = [n for n in cols if n not in ("lat", "lon")]
    features = []
    for i, cell in enumerate(cols["cell"].tolist()):
        rings = [[[_r(x), _r(y)] for x, y in ring] for ring in cell_rings(cell)]
        rings = [ring + ring[:1] for ring in rings]
        geom = (
            {"type": "Polygon", "coordinates": rings}
            if len(rings) == 1
            else {"type": "MultiPolygon", "coordinates": [[ring] for ring in rings]}
        )
        props = {}
        for n in names:
            v = cols[n][i]
            props[n] = str(v) if n == "cell" else (int(v) if n == "resolution" else _r(float(v), 12))
        features.append({"type": "Feature", "geometry": geom, "properties": props})
    return {"type": "FeatureCollection", "features": features}


def write_density(dmap: DensityMap, path: str | Path, levels: Sequence[float] = (0.5, 0.9)) -> Path:
    """Write a density map's cells as ``.geojson`` / ``.json`` (:func:`density_features`) or ``.parquet``
    (:func:`density_rows`), by the suffix, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        body = json.dumps(density_features(dmap, levels), ensure_ascii=False, separators=(",", ":"))
        atomic_write(path, lambda p: Path(p).write_text(body, encoding="utf-8"))
    elif suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(density_rows(dmap, levels))
        atomic_write(path, lambda p: pq.write_table(table, p))
    else:
        raise ConfigError(f"{path}: unknown density format {suffix or '(none)'}; use .geojson or .parquet")
    return path
