"""How fast and how often does the H3 table answer, per resolution? Prints one JSON object.

For each resolution: build time, size, load time; then on uniform, GT-like (a random place + 0–3 km) and
prediction-like (GT-like + 1–2000 km, log-uniform) points: the share of points that still need the exact KD
query (per level set), throughput in points/s (median of repeats) for the exact KD rule, the table path for
country+region, all four levels and the nearest place, and H3 cell computation alone; and the agreement
with the exact rule (must be 1.0).

``--ties``: instead, count disagreements with ``reverse_geocoder.search`` itself on hard points, where only
the tie-break decides: every place whose coordinates are shared with another place, midpoints of near place
pairs with different labels (per level) and points on their bisectors. Both of reverse_geocoder's modes are
run (mode 2, its default, in this process; mode 1 in a child process, since its RGeocoder is a process-wide
singleton), against our gazetteer built for each mode, on the table path and the KD path.

    python bench/bench_gazetteer.py            # resolutions 5, 6, 7; 1M points per set (≈4 min on 2 cores)
    python bench/bench_gazetteer.py --quick    # resolution 6 only; 200k points (≈1 min)
    python bench/bench_gazetteer.py --ties     # 32.5k hard points vs reverse_geocoder (≈1 min + table build)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from geoloc.devices import cpu_info
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


def hard_points(gaz, n_per_level=8000, seed=0):
    """Points whose nearest place is decided by a tie-break: duplicated place coordinates, then per level
    midpoints of near place pairs with different labels and points on the pair's bisector (both exact ties
    when the float arithmetic is exact, near ties otherwise). ``469 + 4 · n_per_level`` points."""
    rng = np.random.default_rng(seed)
    coords = gaz.places.latlon
    _, inv, counts = np.unique(coords, axis=0, return_inverse=True, return_counts=True)
    parts = [coords[counts[inv.ravel()] > 1]]
    _, nb = gaz.tree.query(coords, k=6)
    for lv in LEVELS:
        a, b = nb[:, 0].repeat(5), nb[:, 1:].ravel()
        keep = (gaz.ids[lv][a] != gaz.ids[lv][b]) & (a < b)
        a, b = a[keep], b[keep]
        pick = rng.choice(len(a), min(n_per_level, len(a)), replace=False)
        a, b = a[pick], b[pick]
        mid = (coords[a] + coords[b]) / 2
        # Every other point moved along the bisector: (p_b − p_a) rotated by 90°, times a small integer/8.
        d = coords[b] - coords[a]
        t = rng.integers(-4, 5, len(a))[:, None] / 8.0 * (np.arange(len(a)) % 2 == 1)[:, None]
        parts.append(mid + t * np.c_[-d[:, 1], d[:, 0]])
    return np.vstack(parts)


_MODE1_SCRIPT = """
import sys, numpy as np, reverse_geocoder as rg
pts = np.load(sys.argv[1])
out = rg.search([tuple(p) for p in pts.tolist()], mode=1, verbose=False)
np.save(sys.argv[2], np.array([[r[k] for k in ("name", "admin1", "admin2", "cc")] for r in out], dtype=str))
"""


def _rg_fields(pts, mode):
    """reverse_geocoder's (name, admin1, admin2, cc) per point in ``mode`` (1: in a child process)."""
    if mode == 2:
        import reverse_geocoder as rg

        found = rg.search([tuple(p) for p in pts.tolist()], mode=2, verbose=False)
        return np.array([[r[k] for k in ("name", "admin1", "admin2", "cc")] for r in found], dtype=str)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "pts.npy", Path(tmp) / "out.npy"
        np.save(src, pts)
        subprocess.run([sys.executable, "-c", _MODE1_SCRIPT, str(src), str(dst)], check=True)
        return np.load(dst)


def _field_keys(fields):
    """Published keys per level from (name, admin1, admin2, cc) rows."""
    name, a1, a2, cc = fields.T
    join = np.char.add
    return {
        "country": cc,
        "region": join(join(a1, "_"), cc),
        "sub-region": join(join(join(join(a2, "_"), a1), "_"), cc),
        "city": join(join(join(join(join(join(name, "_"), a2), "_"), a1), "_"), cc),
    }


def tie_disagreements(n_per_level=8000, resolution=6, cache_dir=None):
    """Disagreement counts per level between our gazetteer and reverse_geocoder on :func:`hard_points`."""
    gaz2 = Gazetteer.load(table=False, rg_mode=2)
    pts = hard_points(gaz2, n_per_level)
    theirs = {mode: _field_keys(_rg_fields(pts, mode)) for mode in (2, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        table = load_or_build_table(gaz2, cache_dir or tmp, resolution)[0]
    out = {"hard_points": len(pts), "table_resolution": resolution}
    for ours_mode in (2, 1):
        gaz = gaz2 if ours_mode == 2 else Gazetteer.load(table=False, rg_mode=1)
        gaz.table = table
        for path, use_table in (("table", True), ("kd", False)):
            res = gaz.resolve(pts, LEVELS, use_table=use_table)
            for rg_mode in (2, 1):
                out[f"ours_mode{ours_mode}_{path}_vs_rg_mode{rg_mode}"] = {
                    lv: int((gaz.key_strings(res.ids[lv], lv) != theirs[rg_mode][lv]).sum()) for lv in LEVELS
                }
    return out


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
    ap.add_argument("--ties", action="store_true", help="disagreements with reverse_geocoder on hard points")
    ap.add_argument("--per-level", type=int, default=8000, help="--ties: bisector points per level")
    args = ap.parse_args()
    if args.ties:
        out = {"machine": cpu_info(), "python": platform.python_version()}
        out.update(tie_disagreements(args.per_level))
        print(json.dumps(out))
        return
    n = args.points or (200_000 if args.quick else 1_000_000)
    resolutions = [6] if args.quick else [5, 6, 7]

    t = time.perf_counter()
    gaz = Gazetteer.load(table=False)
    out: dict = {
        "points_per_set": n,
        "places": len(gaz.places),
        "places_load_s": round(time.perf_counter() - t, 2),
    }
    sets = _point_sets(gaz, n)
    exact = {k: gaz.resolve(v, (*LEVELS, "place"), use_table=False).ids for k, v in sets.items()}
    out["kd_only_points_per_s"] = {
        k: _rate(lambda v=v: gaz.resolve(v, LEVELS, use_table=False), n, args.repeats)
        for k, v in sets.items()
    }
    out["h3_cells_points_per_s"] = {
        k: _rate(lambda v=v: h3_cells(v, 6), n, args.repeats) for k, v in sets.items()
    }
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
                for label, levels in (
                    ("country_region", ("country", "region")),
                    ("all_levels", LEVELS),
                    ("place", ("place",)),
                ):
                    r = gaz.resolve(pts, levels)
                    row[f"kd_fallback_{label}"] = round(r.n_exact / n, 4)
                    row[f"points_per_s_{label}"] = _rate(
                        lambda pts=pts, lv=levels: gaz.resolve(pts, lv), n, args.repeats
                    )
                    row[f"agreement_{label}"] = float(
                        np.mean([np.mean(r.ids[lv] == exact[name][lv]) for lv in levels])
                    )
                per_level = gaz.resolve(pts, (*LEVELS, "place"))
                # Share of points each level could not answer from the table alone (one call per level).
                row["kd_fallback_per_level"] = {
                    lv: round(gaz.resolve(pts, (lv,)).n_exact / n, 4) for lv in (*LEVELS, "place")
                }
                assert all((per_level.ids[lv] == exact[name][lv]).all() for lv in (*LEVELS, "place")), (
                    "table disagrees"
                )
                entry[name] = row
            out["resolutions"][res] = entry
            gaz.table = None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
