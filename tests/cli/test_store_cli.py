"""`geoloc store info|sql|verify|failures|import`, driven in-process against stores built in the test."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from geoloc.cli import app
from geoloc.errors import InputError, StoreError
from geoloc.pipeline.store import FeatureStore
from tests.helpers import make_store

runner = CliRunner()


@pytest.fixture
def store(tmp_path):
    make_store(tmp_path / "s", 120, 8, splits={"train": 0.5, "test": 0.5}, failures=3)
    return tmp_path / "s"


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_info(store):
    r = _run("store", "info", store)
    assert r.exit_code == 0, r.output
    assert "test (revision test-rev), dim 8" in r.output
    assert "120 (test 60, train 60)" in r.output
    assert "shards     3" in r.output and "failures   3" in r.output
    assert "unique_country, unique_city" in r.output


def test_sql_formats(store):
    q = "SELECT split, count(*) AS n FROM features GROUP BY split ORDER BY split"
    table = _run("store", "sql", store, q)
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split() == ["split", "n"] and "(2 rows)" in table.output
    rows = list(csv.reader(io.StringIO(_run("store", "sql", store, q, "--format", "csv").output)))
    assert rows == [["split", "n"], ["test", "60"], ["train", "60"]]
    js = json.loads(
        _run("store", "sql", store, "SELECT id, emb FROM features ORDER BY id LIMIT 2", "-f", "json").output
    )
    assert js[0]["id"] == "img0000000" and len(js[0]["emb"]) == 8
    assert "(1 row)" in _run("store", "sql", store, "SELECT * FROM features", "--limit", "1").output


def test_sql_error_is_one_line(store):
    r = _run("store", "sql", store, "SELEC 1")
    assert isinstance(r.exception, InputError) and "SQL failed" in str(r.exception)


def test_missing_store_is_a_store_error(tmp_path):
    r = _run("store", "info", tmp_path / "nope")
    assert isinstance(r.exception, StoreError)


def test_verify_exit_codes(store):
    ok = _run("store", "verify", store)
    assert ok.exit_code == 0 and "OK" in ok.output
    shard = FeatureStore.open(store).shard_paths()[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    bad = _run("store", "verify", store)
    assert bad.exit_code == 1 and "sha256 mismatch" in bad.output


def test_failures_listing(store):
    r = _run("store", "failures", store, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(r.output)))
    assert [x["id"] for x in rows] == ["img-bad-0", "img-bad-1", "img-bad-2"]
    assert rows[0]["reason"] == "corrupt image (synthetic)"


def _parquet(path, n, dim, bad=0, seed=0, prefix="p"):
    rng = np.random.default_rng(seed)
    lat = rng.uniform(-60, 60, n)
    lat[:bad] = np.nan
    pq.write_table(
        pa.table(
            {
                "image_id": [f"{prefix}{i}" for i in range(n)],
                "latitude": lat,
                "longitude": rng.uniform(-170, 170, n),
                "unique_country": ["FR"] * n,
                **{f"f{j}": rng.normal(size=n).astype(np.float32) for j in range(dim)},
            }
        ),
        path,
    )


def test_import_summary_and_failure_rate_exit_code(tmp_path):
    _parquet(tmp_path / "a.parquet", 100, 6, bad=3)
    args = [
        "store",
        "import",
        tmp_path / "a.parquet",
        "--store",
        tmp_path / "s",
        "--backbone",
        "vit-b-32",
        "--emb-col",
        "f*",
        "--id-col",
        "image_id",
        "--split",
        "val",
        "--no-progress",
    ]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    assert "imported 97, skipped (already in store) 0, failed 3" in r.output
    store = FeatureStore.open(tmp_path / "s")
    assert store.rows_per_split() == {"val": 97} and store.dim == 6 and store.verify().ok
    again = _run(*args)
    assert again.exit_code == 0 and "imported 0, skipped (already in store) 97" in again.output
    # 30% bad rows in a new source: the good ones are stored, the command exits 1.
    _parquet(tmp_path / "b.parquet", 10, 6, bad=3, seed=1, prefix="q")
    worse = _run(*[tmp_path / "b.parquet" if a == tmp_path / "a.parquet" else a for a in args])
    assert worse.exit_code == 1
    assert "imported 7, skipped (already in store) 0, failed 3 (30.00%" in worse.output
    store = FeatureStore.open(tmp_path / "s")
    assert store.num_rows() == 104 and store.num_failures() == 6


def test_import_errors_surface_as_geoloc_errors(tmp_path):
    make_store(tmp_path / "s", 10, 8, backbone_name="minilm")
    _parquet(tmp_path / "a.parquet", 5, 8)
    r = _run(
        "store",
        "import",
        tmp_path / "a.parquet",
        "--store",
        tmp_path / "s",
        "--backbone",
        "streetclip",
        "--emb-col",
        "f*",
        "--id-col",
        "image_id",
        "--no-progress",
    )
    assert isinstance(r.exception, StoreError) and "minilm" in str(r.exception)


def test_import_numpy_pair_with_metadata_and_labels_options(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "emb.npy", rng.normal(size=(20, 4)).astype(np.float32))
    pq.write_table(
        pa.table(
            {
                "id": [f"n{i}" for i in range(20)],
                "lat": rng.uniform(-50, 50, 20),
                "lon": rng.uniform(-50, 50, 20),
                "city": ["Lyon"] * 20,
                "unique_country": ["FR"] * 20,
            }
        ),
        tmp_path / "meta.parquet",
    )
    r = _run(
        "store",
        "import",
        tmp_path / "emb.npy",
        "--metadata",
        tmp_path / "meta.parquet",
        "--store",
        tmp_path / "s",
        "--backbone",
        "mine",
        "--labels",
        "city",
        "--revision",
        "v2",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    store = FeatureStore.open(tmp_path / "s")
    assert store.label_columns == ("unique_country", "city") and store.backbone.revision == "v2"
    rows = store.connect().sql("SELECT DISTINCT city, unique_country FROM features").fetchall()
    assert rows == [("Lyon", "FR")]


def _write_source(kind: str, folder, n: int, dim: int):
    """The same rows (80% train, 20% test) as a Parquet file, a NumPy pair, or OSV-5M-style tar shards."""
    import tarfile

    from tests.helpers import make_latlon, synthetic_embeddings

    rng = np.random.default_rng(5)
    latlon = make_latlon(n, rng)
    emb = synthetic_embeddings(latlon, dim)
    ids = [f"k{i}" for i in range(n)]
    split = ["test" if i % 5 == 0 else "train" for i in range(n)]
    meta = {"id": ids, "lat": latlon[:, 0], "lon": latlon[:, 1], "split": split}
    if kind == "parquet":
        pq.write_table(
            pa.table({**meta, "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim)}),
            folder / "src.parquet",
        )
        return folder / "src.parquet"
    if kind == "numpy":
        np.save(folder / "src.npy", emb)
        pq.write_table(pa.table(meta), folder / "src.parquet")
        return folder / "src.npy"
    with tarfile.open(folder / "src.tar", "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            np.save(buf, emb[i])
            js = json.dumps(
                {
                    "id": ids[i],
                    "latitude": latlon[i, 0],
                    "longitude": latlon[i, 1],
                    "split": split[i],
                    "unique_country": f"C{int(latlon[i, 1] + 180) // 40}",
                }
            ).encode()
            for ext, data in (("json", js), ("street_clip.npy", buf.getvalue())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return folder / "src.tar"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "numpy", "wds"])
def test_import_then_train_then_eval(tmp_path, kind):
    """Issue 4's round trip: an imported store is usable by `geoloc train` and `geoloc eval` as is."""
    source = _write_source(kind, tmp_path, 300, 16)
    store, run, ev = tmp_path / "store", tmp_path / "run", tmp_path / "eval"
    r = _run("store", "import", source, "--store", store, "--backbone", "test", "--no-progress")
    assert r.exit_code == 0, r.output
    assert FeatureStore.open(store).rows_per_split() == {"test": 60, "train": 240}
    r = _run(
        "train",
        "--store",
        store,
        "--out",
        run,
        "--preset",
        "small",
        "--steps",
        "3",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--set",
        "model.dim=32",
        "--set",
        "model.depth=1",
    )
    assert r.exit_code == 0, r.output
    r = _run(
        "eval",
        "--store",
        store,
        "--checkpoint",
        run,
        "--out",
        ev,
        "--seeds",
        "0",
        "--steps",
        "4",
        "--no-nll",
        "--no-prdc",
        "--no-plots",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    report = json.loads((ev / "report.json").read_text())
    assert report["n"] == 60 and report["rows"][0]["metrics"]["n_failed"]["mean"] == 0


def test_disk_full_is_one_line(monkeypatch, capsys):
    import errno

    import geoloc.cli as cli

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/store/shards/part-x.parquet")

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert "no space left on device writing /data/store/shards/part-x.parquet" in err
