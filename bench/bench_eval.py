"""How long does ``geoloc eval`` take to turn 1M predictions into the paper's tables and the per-item file?

The model's own cost (sampling, likelihood) depends on the model and the device and is not measured here:
precomputed prediction arrays go through exactly the code ``evaluate`` runs after its pass —
:func:`geoloc.evaluate.score_rows` (distances, GeoScore, thresholds, admin labels of every prediction and
their comparison with the OSV-5M-style ground-truth columns), the Markdown tables, ``report.json`` and the
per-item Parquet file.

Data: ``--n`` ground-truth points (default 1M) clustered like photo locations, with OSV-5M-style
``unique_country`` / ``unique_region`` / ``unique_city`` keys from the protocol's nearest-place rule; one
prediction per item (the true point moved by a log-normal distance, median ≈ 300 km, in a random direction),
0.1 % of them failed (NaN).

Timed (median of ``--repeats``): ``score_s`` (everything ``score_rows`` does, without PRDC), ``table_s``,
``json_s``, ``predictions_parquet_s``, and their sum ``end_to_end_s``; once each: ``prdc_s`` (20 chunks +
unchunked, on by default in ``geoloc eval``) and the gazetteer's label throughput with its cached H3 table
and with the exact KD-tree alone (``labels_*_points_per_s``). The first run builds and caches the label table
(``gazetteer_build_s``). Prints one JSON object. ``--quick`` uses 200k points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clustered_latlon(n: int, rng: np.random.Generator, clusters: int = 2000) -> np.ndarray:
    """Points around ``clusters`` random land-ish centres (lat −55…70), a few hundred km wide."""
    centres = np.stack([rng.uniform(-55, 70, clusters), rng.uniform(-180, 180, clusters)], 1)
    which = rng.integers(0, clusters, n)
    lat = np.clip(centres[which, 0] + rng.normal(0, 2.0, n), -89.9, 89.9)
    lon = (centres[which, 1] + rng.normal(0, 2.5, n) + 180.0) % 360.0 - 180.0
    return np.stack([lat, lon], 1)


def perturb(latlon: np.ndarray, rng: np.random.Generator, median_km: float = 300.0) -> np.ndarray:
    """Move each point by a log-normal great-circle distance in a uniformly random direction."""
    import torch

    from geoloc.sphere import EARTH_RADIUS_KM, expmap, latlon_to_xyz, xyz_to_latlon

    x = latlon_to_xyz(torch.from_numpy(latlon))
    dist = np.minimum(rng.lognormal(np.log(median_km), 1.2, len(latlon)), 19000.0) / EARTH_RADIUS_KM
    v = torch.from_numpy(rng.standard_normal((len(latlon), 3)))
    v = v - (v * x).sum(-1, keepdim=True) * x
    v = v / v.norm(dim=-1, keepdim=True) * torch.from_numpy(dist)[:, None]
    return xyz_to_latlon(expmap(x, v)).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="200k points")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=None, help="gazetteer table cache (default ~/.cache/geoloc)")
    args = ap.parse_args()
    n = 200_000 if args.quick else args.n

    from geoloc.config import EvalConfig
    from geoloc.evaluate import score_rows
    from geoloc.gazetteer import Gazetteer, load_or_build_table
    from geoloc.report import EvalData, RowPredictions, write_predictions

    t0 = time.perf_counter()
    gaz = Gazetteer.load(table=False)
    _, table_path, built = load_or_build_table(gaz, args.cache_dir)
    build_s = time.perf_counter() - t0
    gaz_table = Gazetteer.load(cache_dir=args.cache_dir, build=False)

    rng = np.random.default_rng(0)
    gt = clustered_latlon(n, rng)
    pred = perturb(gt, rng)
    pred[rng.random(n) < 0.001] = np.nan
    levels = ("country", "region", "city")
    gt_ids = gaz_table.label_ids(gt, levels)
    gt_keys = {lv: gaz_table.key_strings(gt_ids[lv], lv).astype(object) for lv in levels}
    data = EvalData(
        ids=np.array([f"img{i:08d}" for i in range(n)], dtype=object),
        latlon=gt,
        levels={lv: f"unique_{lv}" for lv in levels},
        label_source="columns",
        gt_keys=gt_keys,
    )
    row = RowPredictions(
        "model", {"kind": "arrays"}, [0], [pred], log_prob=rng.normal(2.0, 1.0, n), nll_space="sphere"
    )
    cfg = EvalConfig(seeds=(0,), prdc=False)

    times: dict[str, list[float]] = {k: [] for k in ("score_s", "table_s", "json_s", "predictions_parquet_s")}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t = time.perf_counter()
            report = score_rows(data, [row], cfg, gazetteer=gaz_table)
            times["score_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            report.table_markdown()
            times["table_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            body = json.dumps(report.to_json(), allow_nan=False)
            Path(tmp, "report.json").write_text(body)
            times["json_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            path = write_predictions(report, Path(tmp) / "predictions.parquet")
            times["predictions_parquet_s"].append(time.perf_counter() - t)
        parquet_mb = path.stat().st_size / 1e6

    t = time.perf_counter()
    score_rows(data, [row], EvalConfig(seeds=(0,), prdc=True), gazetteer=gaz_table)
    prdc_s = time.perf_counter() - t - statistics.median(times["score_s"])

    def throughput(g: Gazetteer) -> float:
        t = time.perf_counter()
        g.label_ids(pred, levels)
        return n / (time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    r = report.row("model")
    print(
        json.dumps(
            {
                "n": n,
                "repeats": args.repeats,
                **{k: round(v, 3) for k, v in med.items()},
                "end_to_end_s": round(sum(med.values()), 3),
                "predictions_per_s": round(n / sum(med.values())),
                "prdc_s": round(prdc_s, 3),
                "labels_table_points_per_s": round(throughput(gaz_table)),
                "labels_exact_points_per_s": round(throughput(gaz)),
                "gazetteer_table": str(table_path),
                "gazetteer_build_s": round(build_s, 1) if built else 0.0,
                "predictions_parquet_mb": round(parquet_mb, 1),
                "check": {
                    "dist_km": round(r.stat("dist_km")[0], 1),
                    "acc_country": round(r.stat("acc_country")[0], 4),
                    "n_failed": r.metrics["n_failed"][0],
                },
            }
        )
    )


if __name__ == "__main__":
    main()
