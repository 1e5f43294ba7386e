"""How fast does `geoloc store import` bring a Parquet source into a store, and in how much memory?

Writes a synthetic source (default 1M rows, 768-d float32 fixed-size-list embeddings, id/lat/lon, one
label column, 64k-row row groups) in a temp dir, then imports it in a *child process* so that the child's
peak RSS (``VmHWM`` of the child) measures the import alone, not the generator. A second
import of the same source measures the incremental path (every id already stored, nothing written).
Prints one JSON object, with CPU seconds next to wall seconds (on a shared machine the wall time says
more about the neighbours than about the import; ``loadavg_1m`` says how busy it was). Each phase runs
once: at 1M rows a phase is long enough that run-to-run spread is small next to the numbers.

    python bench/bench_import.py              # 1M rows (~3 GB source on disk)
    python bench/bench_import.py --rows 200000
    python bench/bench_import.py --rows 100000 --wds-rows 20000   # also the tar (OSV-5M layout) path
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _generate(path: Path, rows: int, dim: int, chunk: int = 65_536) -> float:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        table = pa.table(
            {
                "id": pa.array([f"img{start + i:09d}" for i in range(n)]),
                "lat": rng.uniform(-90, 90, n),
                "lon": rng.uniform(-180, 180, n),
                "unique_country": pa.array(rng.integers(0, 200, n).astype(str)),
                "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=chunk)
    assert writer is not None
    writer.close()
    return time.perf_counter() - t0


def _generate_wds(folder: Path, rows: int, dim: int, per_shard: int = 10_000) -> float:
    """OSV-5M-like webdataset shards: per sample a jpg stand-in, a .json and a street_clip.npy."""
    import io
    import tarfile

    import numpy as np

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    folder.mkdir()
    for shard, start in enumerate(range(0, rows, per_shard)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tf:
            for i in range(start, min(rows, start + per_shard)):
                buf = io.BytesIO()
                np.save(buf, rng.standard_normal(dim, dtype=np.float32))
                meta = {
                    "id": f"img{i:09d}",
                    "latitude": float(rng.uniform(-90, 90)),
                    "longitude": float(rng.uniform(-180, 180)),
                    "unique_country": "FR",
                    "unique_city": "Paris",
                }
                for ext, data in (
                    ("jpg", b"\xff\xd8" + bytes(2000)),
                    ("json", json.dumps(meta).encode()),
                    ("street_clip.npy", buf.getvalue()),
                ):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return time.perf_counter() - t0


def _child(source: str, store: str) -> None:
    """Run one import; print its counts, wall time, CPU time and peak RSS (this process only) as JSON."""
    from geoloc.pipeline.importers import ImportConfig, import_embeddings

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    rep = import_embeddings(ImportConfig(source=source, store=store, backbone="bench", progress=False))
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child would report the parent's
    # (generator's) peak; VmHWM belongs to this process's own address space.
    hwm_kb = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    print(
        json.dumps(
            {
                "seconds": dt,
                "imported": rep.imported,
                "skipped": rep.skipped_existing,
                "failed": rep.failed,
                "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                "peak_rss_mb": round(hwm_kb / 1024, 1),
            }
        )
    )


def _run_child(source: Path, store: Path) -> dict:
    """The import runs in a fresh interpreter so its peak RSS is the import's, not the generator's."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(source), str(store)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument(
        "--wds-rows",
        type=int,
        default=0,
        help="also time a webdataset (tar) import of this many samples (the per-sample path)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (printed) for inspection")
    ap.add_argument("--child", nargs=2, metavar=("SOURCE", "STORE"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a 100k-row smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rows = min(args.rows, 100_000)
    if args.child:
        _child(*args.child)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_import_"))
    try:
        source = tmp / "source.parquet"
        gen_s = _generate(source, args.rows, args.dim)
        first = _run_child(source, tmp / "store")
        again = _run_child(source, tmp / "store")
        from geoloc.pipeline.store import FeatureStore

        t0 = time.perf_counter()
        report = FeatureStore.open(tmp / "store").verify()
        verify_s = time.perf_counter() - t0
        result = {
            "rows": args.rows,
            "dim": args.dim,
            "source": "parquet, float32 fixed_size_list, zstd, 64k-row row groups",
            "source_mb": round(source.stat().st_size / 2**20, 1),
            "store_mb": round(_du(tmp / "store"), 1),
            "generate_s": round(gen_s, 2),
            "import_s": round(first["seconds"], 2),
            "import_rows_per_s": round(first["imported"] / first["seconds"]),
            "import_cpu_s": round(first["cpu_s"], 2),
            "import_rows_per_cpu_s": round(first["imported"] / first["cpu_s"]),
            "import_peak_rss_mb": first["peak_rss_mb"],
            "reimport_s": round(again["seconds"], 2),
            "reimport_rows_per_s": round(args.rows / again["seconds"]),
            "reimport_skipped": again["skipped"],
            "reimport_cpu_s": round(again["cpu_s"], 2),
            "verify_s": round(verify_s, 2),
            "verify_ok": report.ok,
            "cpu_count": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        if args.wds_rows:
            _generate_wds(tmp / "wds", args.wds_rows, args.dim)
            wds = _run_child(tmp / "wds", tmp / "store_wds")
            result.update(
                {
                    "wds_rows": args.wds_rows,
                    "wds_import_s": round(wds["seconds"], 2),
                    "wds_rows_per_s": round(wds["imported"] / wds["seconds"]),
                    "wds_rows_per_cpu_s": round(wds["imported"] / wds["cpu_s"]),
                    "wds_peak_rss_mb": wds["peak_rss_mb"],
                }
            )
        if args.keep:
            result["dir"] = str(tmp)
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
