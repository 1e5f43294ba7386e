"""End-to-end metric time for N predictions (default 1M): distances, admin labels, the table's numbers, PRDC.

Prints one JSON object with seconds per stage (median of repeats) on synthetic OSV-like data: ground truth =
a random GeoNames place + 0–3 km, predictions = ground truth + 1–2000 km (log-uniform), 1% failed (NaN).
Also compares PRDC's exact float64 KD-tree neighbour search with faiss ``IndexFlatIP`` (float32) on one
20-way chunk of OSV-5M's test size: time, and how far float32 inner products move the k-NN radii.

    python bench/bench_metrics.py              # 1M predictions (≈2 min on 2 cores)
    python bench/bench_metrics.py --quick      # 200k predictions

Either run builds the gazetteer's label table once if it is not cached yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from geoloc.gazetteer import DEFAULT_CACHE_DIR, LEVELS, Gazetteer
from geoloc.metrics import admin_metrics, distance_metrics, distances_km, prdc, score


def _points(gaz, n, seed=0):
    rng = np.random.default_rng(seed)
    base = gaz.places.latlon[rng.integers(0, len(gaz.places), n)]

    def offset(p, r_km):
        ang = rng.uniform(0, 2 * np.pi, len(p))
        lat = np.clip(p[:, 0] + r_km / 111.195 * np.sin(ang), -90, 90)
        lon = p[:, 1] + r_km / 111.195 * np.cos(ang) / np.maximum(np.cos(np.radians(lat)), 1e-3)
        return np.c_[lat, (lon + 180) % 360 - 180]

    gt = offset(base, rng.uniform(0, 3, n))
    pred = offset(gt, np.exp(rng.uniform(0, np.log(2000), n)))
    pred[rng.random(n) < 0.01] = np.nan
    return gt, pred


def _time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3), out


def _faiss_vs_kdtree(points: np.ndarray, k: int = 3) -> dict:
    """k-th neighbour radii (great-circle, km) of one chunk: exact float64 KD-tree vs faiss IndexFlatIP."""
    import faiss
    from scipy.spatial import cKDTree

    rad = np.radians(points)
    xyz = np.stack(
        [np.cos(rad[:, 0]) * np.cos(rad[:, 1]), np.cos(rad[:, 0]) * np.sin(rad[:, 1]), np.sin(rad[:, 0])], 1
    )
    t = time.perf_counter()
    chord = cKDTree(xyz).query(xyz, k=k + 1)[0][:, k]
    kd_s = time.perf_counter() - t
    r_kd = 2 * np.arcsin(chord / 2) * 6371.0
    t = time.perf_counter()
    index = faiss.IndexFlatIP(3)
    index.add(xyz.astype(np.float32))
    ip = index.search(xyz.astype(np.float32), k + 1)[0][:, k]
    faiss_s = time.perf_counter() - t
    r_faiss = np.arccos(np.clip(ip.astype(np.float64), -1, 1)) * 6371.0
    err = np.abs(r_faiss - r_kd)
    return {
        "points": len(points),
        "kdtree_s": round(kd_s, 3),
        "faiss_flat_ip_s": round(faiss_s, 3),
        "radius_abs_err_km_median": round(float(np.median(err)), 4),
        "radius_abs_err_km_p99": round(float(np.quantile(err, 0.99)), 4),
        "radius_km_median": round(float(np.median(r_kd)), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200k predictions")
    ap.add_argument("--n", type=int, default=None, help="number of predictions (default 1M, quick 200k)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    args = ap.parse_args()
    n = args.n or (200_000 if args.quick else 1_000_000)
    out: dict = {"n": n}

    t = time.perf_counter()
    Gazetteer.load(cache_dir=args.cache_dir)  # builds and caches the table if it is missing
    out["first_load_s"] = round(time.perf_counter() - t, 2)
    out["gazetteer_load_s"], gaz = _time(lambda: Gazetteer.load(cache_dir=args.cache_dir), 1)
    gt, pred = _points(gaz, n)
    r = args.repeats

    out["distances_s"], _ = _time(lambda: distance_metrics(distances_km(pred, gt)), r)
    out["labels_pred_and_gt_s"], _ = _time(
        lambda: (gaz.label_ids(pred, LEVELS), gaz.label_ids(gt, LEVELS)), r
    )
    out["admin_metrics_gt_points_s"], _ = _time(lambda: admin_metrics(pred, gaz, LEVELS, gt_latlon=gt), r)
    out["score_all_s"], s = _time(lambda: score(pred, gt, gazetteer=gaz, levels=LEVELS).as_dict(), r)
    out["score_all_plonk_s"], sp = _time(
        lambda: score(pred, gt, gazetteer=gaz, levels=LEVELS, compat="plonk").as_dict(), r
    )
    # Published keys as strings (the OSV-5M columns) go through a per-item normalisation.
    gt_ids = gaz.resolve(gt, ("place",)).ids["place"]
    keys = {lv: gaz.keys[lv][gaz.ids[lv][gt_ids]].tolist() for lv in LEVELS}
    out["admin_metrics_gt_keys_s"], _ = _time(lambda: admin_metrics(pred, gaz, LEVELS, gt_keys=keys), r)
    out["admin_metrics_gt_keys_plonk_s"], _ = _time(
        lambda: admin_metrics(pred, gaz, LEVELS, gt_keys=keys, compat="plonk"), r
    )
    out["metrics_fixed"] = {k: round(v, 5) for k, v in s.items()}
    out["metrics_plonk"] = {k: round(v, 5) for k, v in sp.items()}

    ok = ~np.isnan(pred).any(axis=1)
    osv_n = min(210_122, int(ok.sum()))  # OSV-5M test size
    real, fake = gt[ok][:osv_n], pred[ok][:osv_n]
    out["prdc_osv_size_chunked20_s"], p20 = _time(lambda: prdc(real, fake, k=3, chunks=20), 1)
    out["prdc_osv_size_unchunked_s"], p1 = _time(lambda: prdc(real, fake, k=3, chunks=None), 1)
    out["prdc_osv_size"] = {"chunked20": p20.as_dict(), "unchunked": p1.as_dict()}
    out["prdc_all_chunked20_s"], _ = _time(lambda: prdc(gt[ok], pred[ok], k=3, chunks=20), 1)
    out["neighbours_one_chunk"] = _faiss_vs_kdtree(real[: -(-osv_n // 20)])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
