"""How fast is `geoloc embed` on this machine, and how close to its ceiling?

For each backbone (the ``tiny-random`` tower and open_clip ViT-B-32 with random weights in bf16) it measures,
side by side on the same synthetic JPEGs:

- ``decode_only``: DataLoader workers decoding + preprocessing with no model — the ceiling of the job;
- ``model_only``: the backbone on already-preprocessed batches in the main process;
- ``embed``: the real job (``run_embed``: workers, model, shard writes, commits), end to end and after its
  start-up (model load, worker spawn), as the job's own report measures it.

It also measures the store's streaming read rate: rows/s reading shards back with pyarrow
(``ParquetFile.iter_batches`` → zero-copy float16 numpy), on a synthetic store. Prints one JSON object.

    .venv/bin/python bench/bench_embed.py            # ~2-3 min on 2 cores
    .venv/bin/python bench/bench_embed.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MANIFEST = """
name = "bench-photos"
kind = "folder"
format = "folder"
root = "{root}"
licence = "synthetic"
description = "synthetic JPEGs for bench_embed"
[columns]
id = "id"
lat = "lat"
lon = "lon"
image_path = "path"
[splits.train]
table = "train.csv"
images = "images"
"""


def make_photos(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``n`` photo-like JPEGs (smooth colour fields + noise, quality 90) and a folder manifest for them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rows = []
    for i in range(n):
        c = rng.uniform(0.005, 0.05, 3)
        a = np.stack([np.sin(xx * c[0] + i), np.cos(yy * c[1] - i), np.sin((xx - yy) * c[2])], -1)
        a = (a + 1) * 110 + rng.normal(0, 12, a.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
        (root / "images" / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        rows.append(f"{i:06d},{i:06d}.jpg,{rng.uniform(-80, 80):.4f},{rng.uniform(-179, 179):.4f}")
    (root / "train.csv").write_text("id,path,lat,lon\n" + "\n".join(rows) + "\n")
    manifest = root / "bench.toml"
    manifest.write_text(MANIFEST.format(root=root.as_posix()))
    return manifest


def _job_pieces(manifest: Path, backbone):
    """An EmbedJob that can read + prepare + collate (no store), for the decode-only ceiling."""
    from geoloc.pipeline.embed import EmbedJob, ManifestSource
    from geoloc.pipeline.manifests import load_manifest

    return EmbedJob(
        source=ManifestSource(load_manifest(manifest)),
        skip=set(),
        store=None,
        backbone_name=backbone.name,
        weights=None,
        backbone_config=None,
        preprocessor=backbone.preprocessor,
        collator=backbone.collator,
        label_columns=(),
        device="cpu",
        dtype="fp32",
        shard_rows=1,
        flush_interval_s=1e9,
    )


def decode_only(manifest: Path, backbone, workers: int, batch_size: int) -> dict:
    """Items/s of DataLoader decode + preprocess alone (steady state: timed from the first batch)."""
    from torch.utils.data import DataLoader

    from geoloc.pipeline.engines import _Records, _worker_init

    job = _job_pieces(manifest, backbone)
    loader = DataLoader(
        _Records(job),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=job.collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        multiprocessing_context="spawn" if workers else None,
    )
    # Steady state: timed from the first batch of the *last* worker to start (batches come round-robin),
    # so worker start-up (spawn + imports) is reported apart.
    t0 = time.perf_counter()
    first = None
    n = n_after = 0
    for k, batch in enumerate(loader):
        if k == max(workers - 1, 0):
            first = time.perf_counter()
        elif first is not None:
            n_after += len(batch)
        n += len(batch)
    end = time.perf_counter()
    return {
        "items": n,
        "startup_s": round(first - t0, 2),
        "items_per_s": round(n_after / max(end - first, 1e-9), 1),
    }


def model_only(manifest: Path, backbone, batch_size: int, max_items: int) -> dict:
    """Items/s of the backbone alone on preprocessed batches (median over batches, after one warm-up)."""
    job = _job_pieces(manifest, backbone)
    samples = []
    for record in job.read(0, 1):
        samples.append(job.prepare(record))
        if len(samples) >= max_items:
            break
    batches = [job.collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    batches = [b for b in batches if len(b.ids) == batch_size]
    import torch

    full = torch.get_num_threads()
    out: dict = {"batches": len(batches[1:] or batches)}
    for threads in sorted({1, full}, reverse=True):
        # Both thread counts: on a busy machine OpenMP threads waiting for a descheduled sibling can make
        # the multi-threaded run far slower than one thread (which is why the job balances threads).
        torch.set_num_threads(threads)
        backbone.encode(batches[0].inputs)  # warm-up (kernel selection)
        rates = []
        for b in batches[1:] or batches:
            t = time.perf_counter()
            backbone.encode(b.inputs)
            rates.append(batch_size / (time.perf_counter() - t))
        out["items_per_s" if threads == full else "items_per_s_1_thread"] = round(statistics.median(rates), 1)
    torch.set_num_threads(full)
    return out


def embed(manifest: Path, name: str, dtype: str, workers: int, batch_size: int, store: Path) -> dict:
    """The real job end to end (``items_per_s``) and after start-up (model load, worker spawn)."""
    from geoloc.pipeline.embed import EmbedConfig, run_embed

    t = time.perf_counter()
    report = run_embed(
        EmbedConfig(
            manifest=manifest,
            store=store,
            backbone=name,
            dtype=dtype,
            num_workers=workers,
            batch_size=batch_size,
            shard_size=100,
            progress=False,
        )
    )
    wall = time.perf_counter() - t
    return {
        "items": report.embedded,
        "failed": report.failed,
        "wall_s": round(wall, 2),
        "items_per_s": round(report.embedded / wall, 1),
        "startup_s": round(report.startup_s or 0.0, 2),
        "steady_items_per_s": round(report.steady_items_per_s or 0.0, 1),
    }


def store_read(tmp: Path, rows: int, dim: int, repeats: int) -> dict:
    """rows/s streaming a store back with pyarrow (fp16 emb as zero-copy numpy), median of ``repeats``."""
    import pyarrow.parquet as pq

    from geoloc.pipeline.store import BackboneInfo, FeatureStore, build_table

    store = FeatureStore.create(tmp / "read-store", BackboneInfo("bench", "r", dim, {}), ("country",))
    rng = np.random.default_rng(0)
    per = 50_000
    for s in range(0, rows, per):
        n = min(per, rows - s)
        table = build_table(
            [f"id{s + i}" for i in range(n)],
            "train",
            rng.uniform(-80, 80, n),
            rng.uniform(-179, 179, n),
            rng.standard_normal((n, dim), np.float32),
            {"country": rng.choice(["FR", "JP", "BR"], n).tolist()},
            ("country",),
        )
        store.write_shard(table, "bench")
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        total = 0
        checksum = 0.0
        for path in store.shard_paths():
            for batch in pq.ParquetFile(path).iter_batches(
                batch_size=8192, columns=["id", "lat", "lon", "emb"]
            ):
                col = batch.column("emb")
                emb = col.flatten().to_numpy(zero_copy_only=True).reshape(len(col), dim)
                checksum += float(emb[0, 0])
                total += len(col)
        rates.append(total / (time.perf_counter() - t))
    mb = sum(p.stat().st_size for p in store.shard_paths()) / 1e6
    return {
        "rows": rows,
        "dim": dim,
        "file_mb": round(mb, 1),
        "rows_per_s": round(statistics.median(rates)),
        "emb_mb_per_s": round(statistics.median(rates) * dim * 2 / 1e6, 1),
        "repeats": repeats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--size", default="512x384", help="JPEG width x height")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--read-rows", type=int, default=200_000)
    p.add_argument("--quick", action="store_true", help="96 images, 50k read rows")
    args = p.parse_args()
    if args.quick:
        args.images, args.read_rows = 96, 50_000
    size = tuple(int(v) for v in args.size.lower().split("x"))

    import torch

    from geoloc.pipeline.backbones import load_backbone

    out: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
        },
        "images": args.images,
        "image_size": list(size),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "backbones": {},
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        manifest = make_photos(tmp / "photos", args.images, size)
        for name, dtype in (("tiny-random", "auto"), ("open_clip:ViT-B-32/random", "bf16")):
            bb = load_backbone(name).to("cpu", dtype)
            res = {
                "dtype": str(bb.dtype).removeprefix("torch."),
                "decode_only": decode_only(manifest, bb, args.workers, args.batch_size),
                "model_only": model_only(manifest, bb, args.batch_size, max_items=min(args.images, 192)),
                "embed": embed(
                    manifest,
                    name,
                    dtype,
                    args.workers,
                    args.batch_size,
                    tmp / f"store-{len(out['backbones'])}",
                ),
            }
            ceiling = res["decode_only"]["items_per_s"]
            res["embed_steady_vs_decode_only"] = (
                round(res["embed"]["steady_items_per_s"] / ceiling, 3) if ceiling else None
            )
            out["backbones"][name] = res
            del bb
        out["store_read"] = store_read(tmp, args.read_rows, 768, repeats=3)
    out["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
