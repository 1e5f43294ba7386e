"""How fast and how often does the H3 table answer, per resolution? Prints one JSON object.

For each resolution: build time, size, load time; then on uniform, GT-like (a random place + 0–3 km) and
prediction-like (GT-like + 1–2000 km, log-uniform) points: the share of points that still need the exact KD
query (per level set), throughput in points/s (median of repeats) for the exact KD rule, the table path for
country+region, all four levels and the nearest place, and H3 cell computation alone; and the agreement
with the exact rule (must be 1.0).

    python bench/bench_gazetteer.py            # resolutions 5, 6, 7; 1M points per set (≈4 min on 2 cores)
    python bench/bench_gazetteer.py --quick    # resolution 6 only; 200k points (≈1 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

from geoloc.gazetteer import LEVELS, Gazetteer, LabelTable, h3_cells, load_or_build_table


def _uniform(rng, n):
    z = rng.uniform(-1, 1, n)
    return np.c_[np.degrees(np.arcsin(z)), rng.uniform(-180, 180, n)]


def _offset(rng, latlon, lo_km, hi_km, log=False):
    n = len(latlon)
    r = np.exp(rng.uniform(np.log(lo_km), np.log(hi_km), n)) if log else rng.uniform(lo_km, hi_km, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    lat = np.clip(latlon[:, 0] + r / 111.195 * np.sin(ang), -90, 90)
    lon = latlon[:, 1] + r / 111.195 * np.cos(ang) / np.maximum(np.cos(np.radians(lat)), 1e-3)
    return np.c_[lat, (lon + 180) % 360 - 180]


def _point_sets(gaz, n, seed=0):
    rng = np.random.default_rng(seed)
    gt = _offset(rng, gaz.places.latlon[rng.integers(0, len(gaz.places), n)], 0.0, 3.0)
    return {"uniform": _uniform(rng, n), "gt_like": gt, "pred_like": _offset(rng, gt, 1.0, 2000.0, log=True)}


def _rate(fn, n, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(n / statistics.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="resolution 6 only, 200k points")
    ap.add_argument("--points", type=int, default=None, help="points per set (default 1M, quick 200k)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.points or (200_000 if args.quick else 1_000_000)
    resolutions = [6] if args.quick else [5, 6, 7]

    t = time.perf_counter()
    gaz = Gazetteer.load(table=False)
    out: dict = {"points_per_set": n, "places": len(gaz.places), "places_load_s": round(time.perf_counter() - t, 2)}
    sets = _point_sets(gaz, n)
    exact = {k: gaz.resolve(v, (*LEVELS, "place"), use_table=False).ids for k, v in sets.items()}
    out["kd_only_points_per_s"] = {
        k: _rate(lambda v=v: gaz.resolve(v, LEVELS, use_table=False), n, args.repeats) for k, v in sets.items()
    }
    out["h3_cells_points_per_s"] = {k: _rate(lambda v=v: h3_cells(v, 6), n, args.repeats) for k, v in sets.items()}
    out["resolutions"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for res in resolutions:
            table, path, _ = load_or_build_table(gaz, tmp, res, force=True)
            t = time.perf_counter()
            LabelTable.load(path, gaz.places.sha256, res)
            entry = dict(table.build_stats, load_s=round(time.perf_counter() - t, 2))
            gaz.table = table
            for name, pts in sets.items():
                row = {}
                for label, levels in (("country_region", ("country", "region")), ("all_levels", LEVELS), ("place", ("place",))):
                    r = gaz.resolve(pts, levels)
                    row[f"kd_fallback_{label}"] = round(r.n_exact / n, 4)
                    row[f"points_per_s_{label}"] = _rate(lambda pts=pts, lv=levels: gaz.resolve(pts, lv), n, args.repeats)
                    row[f"agreement_{label}"] = float(np.mean([np.mean(r.ids[lv] == exact[name][lv]) for lv in levels]))
                per_level = gaz.resolve(pts, (*LEVELS, "place"))
                # Share of points each level could not answer from the table alone (one call per level).
                row["kd_fallback_per_level"] = {lv: round(gaz.resolve(pts, (lv,)).n_exact / n, 4) for lv in (*LEVELS, "place")}
                assert all((per_level.ids[lv] == exact[name][lv]).all() for lv in (*LEVELS, "place")), "table disagrees"
                entry[name] = row
            out["resolutions"][res] = entry
            gaz.table = None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
