"""How fast does the feature loader deliver training batches, next to raw Parquet reads of the same files?

Writes a synthetic 768-d float16 feature store (``--rows``, default 500k, in 10 shards) to a temp dir, then
times, each in a fresh process (so peak RSS is per reader), over the same files:

- ``pyarrow``: ``pq.ParquetFile(f).iter_batches`` of (lat, lon, emb), emb as a zero-copy float16 view —
  the raw-read ceiling;
- ``pyarrow_fp32``: the same plus the float16 → float32 conversion the model needs;
- ``duckdb_list`` / ``duckdb_fixed``: DuckDB ``to_arrow_reader`` with emb as read (FLOAT[] list) and cast to
  ``FLOAT[768]`` (what the loader uses; DuckDB cannot hand out float16 at all);
- ``loader_shuffled``: :class:`FeatureLoader`, shuffled (65,536-row windows), prefetch thread, batch 1024,
  consumed as the trainer would (one full epoch); ``loader_shuffled_p4``: the same with 4 partitions;
- ``loader_ordered``: unshuffled, one pass.

Prints one JSON object: rows/s (median of ``--repeats`` one-pass runs, the methods interleaved so that a busy
machine slows them alike; page cache warm) and peak RSS per method, plus loader/pyarrow ratios. ``--quick``
uses 100k rows; ``duckdb_list`` and ``loader_shuffled_p4`` run only when named in ``--methods``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 768
BATCH = 1024
METHODS = (
    "pyarrow",
    "pyarrow_fp32",
    "duckdb_list",
    "duckdb_fixed",
    "loader_shuffled",
    "loader_shuffled_p4",
    "loader_ordered",
)
DEFAULT_METHODS = ("pyarrow", "pyarrow_fp32", "duckdb_fixed", "loader_shuffled", "loader_ordered")


def write_store(root: Path, rows: int, shards: int = 10) -> None:
    from geoloc.pipeline.store import BackboneInfo, FeatureStore, build_table

    rng = np.random.default_rng(0)
    store = FeatureStore.create(root, BackboneInfo("bench", "r0", DIM), label_columns=["unique_country"])
    countries = np.array(["FR", "DE", "US", "JP", "BR"], dtype=object)
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    for a, b in itertools.pairwise(bounds):
        n = b - a
        table = build_table(
            [f"r{i}" for i in range(a, b)],
            "train",
            rng.uniform(-90, 90, n),
            rng.uniform(-180, 180, n),
            rng.standard_normal((n, DIM), dtype=np.float32),
            {"unique_country": countries[rng.integers(0, 5, n)]},
            ["unique_country"],
            check=False,
        )
        store.write_shard(table, "bench")
    store.close()


def _one_pass(method: str, store: Path) -> tuple[int, float]:
    """Read everything once with ``method``; returns (rows delivered, seconds)."""
    import pyarrow.parquet as pq

    from geoloc.pipeline.loader import FeatureLoader
    from geoloc.pipeline.store import FeatureStore

    paths = FeatureStore.open(store).shard_paths()
    rows = 0
    if method.startswith("loader"):  # built before the clock starts: its row count is a one-off per run
        shuffle = method.startswith("loader_shuffled")
        parts = 4 if method.endswith("_p4") else 1
        loader = FeatureLoader(
            [store], BATCH, split="train", shuffle=shuffle, partitions=parts, seed=0, drop_last=False
        )
    t0 = time.perf_counter()
    if method.startswith("pyarrow"):
        for p in paths:
            for batch in pq.ParquetFile(p).iter_batches(batch_size=BATCH, columns=["lat", "lon", "emb"]):
                col = batch.column(2)
                emb = col.flatten().to_numpy(zero_copy_only=True).reshape(len(col), DIM)
                if method == "pyarrow_fp32":
                    emb = emb.astype(np.float32)
                rows += len(emb)
    elif method.startswith("duckdb"):
        import duckdb

        con = duckdb.connect()
        emb_sql = "emb" if method == "duckdb_list" else f"emb::FLOAT[{DIM}] AS emb"
        files = ", ".join(f"'{p}'" for p in paths)
        reader = con.sql(f"SELECT lat, lon, {emb_sql} FROM read_parquet([{files}])").to_arrow_reader(BATCH)
        for batch in reader:
            col = batch.column(2)
            emb = col.flatten().to_numpy(zero_copy_only=True).reshape(len(col), DIM)
            rows += len(emb)
    else:
        it = iter(loader)
        for _ in range(loader.batches_per_epoch):  # one epoch, consumed as a trainer would
            cond, _ = next(it)
            rows += len(cond)
        it.close()
    return rows, time.perf_counter() - t0


def worker(method: str, store: Path) -> dict:
    rows, seconds = _one_pass(method, store)
    return {
        "rows_per_s": rows / seconds,
        "rows": rows,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--quick", action="store_true", help="100k rows, 2 repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {METHODS}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.store))))
        return
    rows, repeats = (100_000, 2) if args.quick else (args.rows, args.repeats)
    methods = args.methods.split(",")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        store = Path(tmp) / "store"
        t0 = time.perf_counter()
        write_store(store, rows)
        write_s = time.perf_counter() - t0
        _one_pass("pyarrow", store)  # warm the page cache once
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(repeats):  # interleaved, so a busy machine slows every method alike
            for method in methods:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", method, "--store", str(store)],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
        results = {
            m: {
                "rows_per_s": round(statistics.median(r["rows_per_s"] for r in rs)),
                "rows": rs[0]["rows"],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            }
            for m, rs in runs.items()
        }
        size_mb = sum(p.stat().st_size for p in (store / "shards").iterdir()) / 2**20
    base = results.get("pyarrow", {}).get("rows_per_s")
    ratios = {
        f"{m}_vs_pyarrow": round(r["rows_per_s"] / base, 3)
        for m, r in results.items()
        if base and m.startswith("loader")
    }
    print(
        json.dumps(
            {
                "bench": "loader",
                "rows": rows,
                "dim": DIM,
                "batch_size": BATCH,
                "emb_dtype_stored": "float16",
                "store_mb": round(size_mb),
                "write_s": round(write_s, 1),
                "repeats": repeats,
                "cpu_count": os.cpu_count(),
                "results": results,
                "ratios": ratios,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
