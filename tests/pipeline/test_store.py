"""Feature store: schema, manifest, atomic writes, orphans, verify, DuckDB views, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geoloc.errors import InputError, StoreError
from geoloc.pipeline.items import Failure
from geoloc.pipeline.store import (
    BackboneInfo,
    FeatureStore,
    build_table,
    hash_ids,
    store_schema,
)
from tests.helpers import make_store

BB = BackboneInfo(name="test", revision="r1", dim=8, preprocessing={"crop": 224})


def _table(ids, dim=8, split="train", labels=None, label_columns=(), seed=0):
    rng = np.random.default_rng(seed)
    n = len(ids)
    return build_table(
        ids,
        split,
        rng.uniform(-80, 80, n),
        rng.uniform(-170, 170, n),
        rng.normal(size=(n, dim)),
        labels,
        label_columns,
    )


def test_build_table_schema_and_fp16_values():
    emb = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float64)
    t = build_table(
        ["a", "b", "c", "d", "e"],
        ["train", "train", "val", "val", "test"],
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        emb,
        {"unique_country": ["FR", None, "DE", "IT", "ES"]},
        ["unique_country", "unique_city"],
    )
    assert t.schema.equals(store_schema(8, ["unique_country", "unique_city"]))
    assert t.column("unique_city").null_count == 5
    assert t.column("unique_country").to_pylist() == ["FR", None, "DE", "IT", "ES"]
    back = t.column("emb").combine_chunks().flatten().to_numpy().reshape(5, 8)
    assert back.dtype == np.float16
    np.testing.assert_allclose(back, emb, rtol=1e-3, atol=1e-3)
    assert t.column("lat").type == pa.float64()


@pytest.mark.parametrize(
    ("lat", "emb_val", "match"),
    [
        (float("nan"), 0.0, "lat/lon"),
        (91.0, 0.0, "lat/lon"),
        (0.0, np.inf, "non-finite"),
        (0.0, 1e6, "float16"),
    ],
)
def test_build_table_rejects_bad_rows(lat, emb_val, match):
    emb = np.zeros((2, 4))
    emb[1, 2] = emb_val
    with pytest.raises(InputError, match=match):
        build_table(["a", "b"], "train", [0.0, lat], [0.0, 0.0], emb)


def test_build_table_rejects_unknown_labels_and_length_mismatch():
    with pytest.raises(InputError, match="not label columns"):
        build_table(["a"], "train", [0.0], [0.0], np.zeros((1, 4)), {"x": ["1"]}, [])
    with pytest.raises(InputError, match="same length"):
        build_table(["a", "b"], "train", [0.0], [0.0, 1.0], np.zeros((2, 4)))


def test_create_writes_manifest_and_reopen_checks_compatibility(tmp_path):
    root = tmp_path / "s"
    store = FeatureStore.create(
        root, BB, ["unique_country"], source={"name": "demo", "kind": "embed", "manifest_sha256": "abc"}
    )
    m = json.loads((root / "store.json").read_text())
    assert m["format"] == "geoloc-feature-store" and m["version"] == 1
    assert m["backbone"] == {"name": "test", "revision": "r1", "dim": 8, "preprocessing": {"crop": 224}}
    assert m["label_columns"] == ["unique_country"]
    assert [s["name"] for s in m["sources"]] == ["demo"] and m["sources"][0]["added"]
    store.close()
    # Same source again: not recorded twice; empty label list adopts the store's.
    again = FeatureStore.create(
        root, BB, (), source={"name": "demo", "kind": "embed", "manifest_sha256": "abc"}
    )
    assert again.label_columns == ("unique_country",) and len(again.sources) == 1
    with pytest.raises(StoreError, match="dim 16"):
        FeatureStore.create(root, BackboneInfo("test", "r1", 16), ())
    with pytest.raises(StoreError, match="'other'"):
        FeatureStore.create(root, BackboneInfo("other", "r1", 8), ())
    with pytest.raises(StoreError, match="label columns"):
        FeatureStore.create(root, BB, ["city"])
    assert FeatureStore.open(root).backbone == BB
    assert hash(FeatureStore.open(root).backbone) == hash(BB)


def test_open_missing_or_corrupt_store(tmp_path):
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(tmp_path)
    (tmp_path / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        FeatureStore.open(tmp_path)


def test_write_and_read_back_through_duckdb(tmp_path):
    store = FeatureStore.create(tmp_path / "s", BB, ["unique_country"])
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    lat, lon = rng.uniform(-80, 80, 40), rng.uniform(-170, 170, 40)
    ids = [f"x{i}" for i in range(40)]
    t = build_table(
        ids,
        ["train"] * 30 + ["test"] * 10,
        lat,
        lon,
        emb,
        {"unique_country": ["C"] * 40},
        store.label_columns,
    )
    rec = store.write_shard(t, "job")
    assert rec["file"] == "shards/part-job-000000.parquet" and rec["rows"] == 40
    assert rec["splits"] == {"test": 10, "train": 30}
    assert store.num_rows() == 40 and store.num_rows("test") == 10
    assert store.shard_paths("val") == [] and len(store.shard_paths("test")) == 1
    ro = FeatureStore.open(tmp_path / "s")
    con = ro.connect()
    rows = con.sql("SELECT id, lat, lon, emb FROM features ORDER BY CAST(substr(id, 2) AS INT)").fetchall()
    assert [r[0] for r in rows] == ids
    np.testing.assert_allclose([r[1] for r in rows], lat)
    np.testing.assert_allclose(np.array([r[3] for r in rows]), emb, rtol=1e-3, atol=1e-3)
    assert con.sql("SELECT typeof(emb) FROM features LIMIT 1").fetchall()[0][0] == "FLOAT[8]"
    assert con.sql("SELECT count(*) FROM failures").fetchall()[0][0] == 0


def test_empty_store_views(tmp_path):
    store = FeatureStore.create(tmp_path / "s", BB, ["a"])
    con = store.connect()
    assert con.sql("SELECT count(*) FROM features").fetchall() == [(0,)]
    assert [d[0] for d in con.sql("SELECT * FROM features").description] == [
        "id",
        "split",
        "lat",
        "lon",
        "a",
        "emb",
    ]
    assert store.verify().ok


def test_write_shard_refuses_duplicate_ids(tmp_path):
    store = FeatureStore.create(tmp_path / "s", BB)
    store.write_shard(_table(["a", "b"]), "t")
    with pytest.raises(StoreError, match="already in the store"):
        store.write_shard(_table(["c", "a"]), "t")
    with pytest.raises(StoreError, match="repeats ids"):
        store.write_shard(_table(["d", "d"]), "t")
    with pytest.raises(StoreError, match="schema"):
        store.write_shard(_table(["e"], dim=4), "t")
    assert store.existing_ids() == {"a", "b"}


def test_failures_table(tmp_path):
    store = FeatureStore.create(tmp_path / "s", BB)
    assert store.write_failures([], "t") is None
    store.write_failures(
        [Failure("x", "a.zip:x.jpg", "truncated JPEG", "train"), Failure("y", "b.jpg", "CMYK", "test")], "t"
    )
    t = FeatureStore.open(tmp_path / "s").failures_table()
    assert t.column("id").to_pylist() == ["x", "y"]
    assert t.column("reason").to_pylist() == ["truncated JPEG", "CMYK"]
    assert set(t.column("task").to_pylist()) == {"t"}
    rows = store.connect().sql("SELECT id, split, source FROM failures ORDER BY id").fetchall()
    assert rows == [("x", "train", "a.zip:x.jpg"), ("y", "test", "b.jpg")]


def test_uncommitted_shard_is_an_orphan_until_cleaned(tmp_path):
    root = tmp_path / "s"
    store = make_store(root, 60, 8, shards=2)
    orphan_rec = store.write_shard_file(_table(["new1", "new2"]), "t9")
    # Invisible to every reader.
    ro = FeatureStore.open(root)
    assert "new1" not in ro.existing_ids() and ro.num_rows() == 60
    assert ro.connect().sql("SELECT count(*) FROM features").fetchall() == [(60,)]
    report = ro.verify()
    assert not report.ok and report.orphans == [orphan_rec["file"]]
    # A stale temporary from a killed writer is an orphan too.
    (root / "shards" / ".part-t9-000007.parquet.tmp-123").write_bytes(b"half")
    store.close()
    reopened = FeatureStore.create(root, store.backbone)
    assert reopened.orphans() == [] and not (root / orphan_rec["file"]).exists()
    assert reopened.verify().ok
    # The ids are not embedded, so they can be written again without duplicates.
    reopened.write_shard(_table(["new1", "new2"]), "t9")
    assert reopened.verify().ok and reopened.num_rows() == 62


def test_orphans_of_a_live_writer_survive_another_writer_opening(tmp_path):
    root = tmp_path / "s"
    a = FeatureStore.create(root, BB)
    rec = a.write_shard_file(_table(["a"]), "ta")
    b = FeatureStore.create(root, BB)  # a still holds the store open: b must not delete a's pending file
    assert (root / rec["file"]).exists()
    a.commit([rec])
    b.write_shard(_table(["b"]), "tb")
    assert FeatureStore.open(root).existing_ids() == {"a", "b"}


def test_verify_detects_tampering(tmp_path):
    root = tmp_path / "s"
    store = make_store(root, 90, 8, shards=3)
    assert store.verify().ok
    shards = store.shard_paths()
    # Row-count lie in the manifest.
    m = json.loads((root / "store.json").read_text())
    m["shards"][0]["rows"] += 1
    (root / "store.json").write_text(json.dumps(m))
    # Bytes changed in another shard; a third one deleted.
    data = bytearray(shards[1].read_bytes())
    data[100] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    shards[2].unlink()
    report = FeatureStore.open(root).verify()
    text = "\n".join(report.problems)
    assert not report.ok
    assert "rows on disk" in text and "sha256 mismatch" in text and "listed but missing" in text


def test_verify_detects_duplicate_ids_across_shards(tmp_path):
    root = tmp_path / "s"
    store = FeatureStore.create(root, BB)
    r1 = store.write_shard_file(_table(["a", "b"]), "t")
    r2 = store.write_shard_file(_table(["b", "c"]), "t")  # not yet committed, so not refused
    store.commit([r1, r2])
    report = store.verify()
    assert any("duplicate" in p for p in report.problems)


def test_verify_detects_dictionary_encoded_emb(tmp_path):
    root = tmp_path / "s"
    store = FeatureStore.create(root, BB)
    rec = store.write_shard(_table(["a", "b"]), "t")
    path = root / rec["file"]
    pq.write_table(pq.read_table(path), path, use_dictionary=True)
    m = json.loads((root / "store.json").read_text())
    from geoloc.files import sha256_file

    m["shards"][0]["sha256"] = sha256_file(path)
    (root / "store.json").write_text(json.dumps(m))
    assert any("dictionary" in p for p in FeatureStore.open(root).verify().problems)


def test_hash_ids_is_slice_invariant_and_index_membership():
    arr = pa.array(["a", "", "é" * 50, "abc", "abd", "x" * 1000])
    h1, h2 = hash_ids(arr)
    s1, s2 = hash_ids(arr.slice(2, 3))
    assert (h1[2:5] == s1).all() and (h2[2:5] == s2).all()
    assert len(set(h1.tolist())) == 6
    ids = [f"id{i}" for i in range(100_000)]
    from geoloc.pipeline.store import IdIndex

    index = IdIndex()
    index.add(pa.array(ids[:50_000]))
    mask = index.contains(pa.array(ids))
    assert mask[:50_000].all() and not mask[50_000:].any()


def test_id_index_handles_64_bit_collisions_and_many_small_adds():
    from geoloc.pipeline.store import IdIndex

    index = IdIndex()
    index.add_hashes(np.array([5, 5, 5, 7], np.uint64), np.array([1, 2, 3, 4], np.uint64))
    got = index.contains_hashes(
        np.array([5, 5, 5, 5, 7, 7, 6], np.uint64), np.array([3, 1, 2, 9, 4, 5, 1], np.uint64)
    )
    assert got.tolist() == [True, True, True, False, True, False, False]
    rng = np.random.default_rng(0)
    h1, h2 = rng.integers(0, 2**63, (2, 20_000), dtype=np.uint64)
    big = IdIndex()
    for s in range(0, 20_000, 300):  # many runs, merged as they grow
        assert not big.contains_hashes(h1[s : s + 300], h2[s : s + 300]).any()
        big.add_hashes(h1[s : s + 300], h2[s : s + 300])
    assert big.contains_hashes(h1, h2).all() and len(big) == 20_000
    assert not big.contains_hashes(h1, h2 + np.uint64(1)).any()


def _concurrent_writer(root: str, task: str, k: int) -> None:
    store = FeatureStore.create(root, BB)
    for j in range(k):
        store.write_shard(_table([f"{task}-{j}-{i}" for i in range(5)], seed=j), task)


def test_concurrent_writers_with_distinct_tasks(tmp_path):
    root = tmp_path / "s"
    FeatureStore.create(root, BB).close()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_concurrent_writer, args=(str(root), f"w{w}", 4)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    store = FeatureStore.open(root)
    assert store.num_rows() == 60 and len(store.shard_paths()) == 12
    assert store.verify().ok


def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path):
    """Kill a writer at a random point many shards in: listed shards verify, no duplicates, orphans go."""
    root = tmp_path / "s"
    FeatureStore.create(root, BB).close()
    script = textwrap.dedent(f"""
        import numpy as np
        from geoloc.pipeline.store import BackboneInfo, FeatureStore, build_table
        store = FeatureStore.create({str(root)!r}, BackboneInfo("test", "r1", 8, {{"crop": 224}}))
        done = store.existing_ids()
        rng = np.random.default_rng(0)
        for j in range(10_000):
            ids = [f"k{{j}}-{{i}}" for i in range(200)]
            if ids[0] in done:
                continue
            t = build_table(ids, "train", rng.uniform(-80, 80, 200), rng.uniform(-170, 170, 200),
                            rng.normal(size=(200, 8)))
            store.write_shard(t, "kill")
            print(j, flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    for _ in range(8):  # let it commit a few shards, then kill it mid-flight
        assert proc.stdout.readline()
    time.sleep(0.013)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = FeatureStore.create(root, BB)  # write-open removes any orphan
    report = store.verify()
    assert report.ok, report.summary()
    n = store.num_rows()
    assert n >= 8 * 200 and n % 200 == 0
    assert len(store.existing_ids()) == n


def test_repair_removes_duplicate_ids_keeping_the_first_copy(tmp_path):
    from geoloc.pipeline.store import IdIndex, repair_store

    root = tmp_path / "s"
    store = FeatureStore.create(root, BB)
    store.write_shard(_table([f"a{i}" for i in range(100)], seed=1), "t")
    # What two unlocked writers used to do: a second shard that repeats 40 ids of the first.
    dup = store.write_shard_file(_table([f"a{i}" for i in range(60, 140)], seed=2), "u", known_ids=IdIndex())
    store.commit([dup])
    store.write_shard(_table([f"c{i}" for i in range(30)], seed=3), "t")
    first = dict(store.connect().sql("SELECT id, lat FROM features").fetchall()[:100])
    store.close()
    report = FeatureStore.open(root).verify()
    assert not report.ok and report.duplicate_ids == 40 and "geoloc store repair" in report.summary()
    assert repair_store(root) == (40, 1)
    fixed = FeatureStore.open(root)
    rows = fixed.connect().sql("SELECT id, lat FROM features").fetchall()
    assert len(rows) == 170 and len({r[0] for r in rows}) == 170 and fixed.num_rows() == 170
    assert all(dict(rows)[k] == v for k, v in first.items())  # the first copy was kept
    assert fixed.verify().ok and not (root / dup["file"]).exists()
    assert repair_store(root) == (0, 0)


def test_verify_tells_a_live_writers_files_from_orphans(tmp_path):
    from geoloc.pipeline.store import writer_lock

    root = tmp_path / "s"
    make_store(root, 60, 8, shards=2).close()
    with writer_lock(root, "`geoloc store import`"):
        store = FeatureStore.create(root, BB)
        rec = store.write_shard_file(_table(["new1"]), "t9")
        live = FeatureStore.open(root).verify()
        assert live.ok and live.in_progress == [rec["file"]] and live.orphans == []
        assert "live `geoloc store import`" in live.summary()
        store.close()
    dead = FeatureStore.open(root).verify()  # the writer is gone: now an orphan
    assert not dead.ok and dead.orphans == [rec["file"]]
