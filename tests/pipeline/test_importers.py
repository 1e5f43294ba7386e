"""`geoloc store import`: round trips for tar / Parquet / NumPy sources, incremental rules, bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from geoloc.errors import InputError, StoreError
from geoloc.pipeline.importers import ImportConfig, import_embeddings, open_source
from geoloc.pipeline.store import FeatureStore, store_schema
from tests.helpers import make_latlon, make_store, synthetic_embeddings


def _data(n: int, dim: int, seed: int = 0, prefix: str = "r"):
    rng = np.random.default_rng(seed)
    latlon = make_latlon(n, rng)
    emb = synthetic_embeddings(latlon, dim, seed=seed) * 3.0
    ids = np.asarray([f"{prefix}{i}" for i in range(n)], dtype=object)
    country = np.asarray([f"C{int(x) // 30}" for x in latlon[:, 1] + 180], dtype=object)
    return ids, latlon[:, 0].copy(), latlon[:, 1].copy(), emb, country


def _cfg(source, store, **kw) -> ImportConfig:
    kw.setdefault("backbone", "streetclip")
    kw.setdefault("progress", False)
    return ImportConfig(source=str(source), store=store, **kw)


def _read_store(root) -> dict[str, tuple]:
    """id → (split, lat, lon, emb float32, *labels), through DuckDB, as any consumer would read it."""
    s = FeatureStore.open(root)
    labels = "".join(f', "{c}"' for c in s.label_columns)
    rows = s.connect().sql(f"SELECT id, split, lat, lon, emb{labels} FROM features").fetchall()
    return {r[0]: (r[1], r[2], r[3], np.asarray(r[4], np.float32), *r[5:]) for r in rows}


def _failures(root) -> dict[str, str]:
    t = FeatureStore.open(root).failures_table()
    return dict(zip(t.column("id").to_pylist(), t.column("reason").to_pylist(), strict=True))


def _assert_round_trip(root, ids, lat, lon, emb, keep=None):
    got = _read_store(root)
    keep = np.ones(len(ids), bool) if keep is None else keep
    assert set(got) == set(ids[keep].tolist())
    for i in np.flatnonzero(keep)[:: max(1, keep.sum() // 50)]:
        _split, glat, glon, gemb = got[ids[i]][:4]
        assert glat == pytest.approx(lat[i]) and glon == pytest.approx(lon[i])
        np.testing.assert_allclose(gemb, emb[i], rtol=1e-3, atol=1e-3)  # float16 precision


def _fixed_list(emb: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


# ------------------------------------------------------------------------------------------ Parquet
def test_parquet_fixed_size_list_round_trip_bad_rows_and_reimport(tmp_path):
    ids, lat, lon, emb, country = _data(500, 24)
    lat[3] = np.nan  # NaN coordinate
    lon[4] = 181.0  # out of range
    lat[5] = -91.0
    emb[6, 2] = np.inf  # non-finite embedding
    emb[7, 0] = 1e6  # beyond float16
    ids[9] = ids[8]  # duplicate within the source
    ids[10] = None  # missing id
    split = np.where(np.arange(500) % 5 == 0, "test", "train")
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "lat": lat,
                "lon": lon,
                "emb": _fixed_list(emb),
                "unique_country": country,
                "split": split,
                "other": np.arange(500),
            }
        ),
        tmp_path / "src.parquet",
        row_group_size=128,
    )
    root = tmp_path / "store"
    rep = import_embeddings(_cfg(tmp_path / "src.parquet", root, chunk_rows=100, shard_rows=150))
    assert (rep.imported, rep.skipped_existing, rep.failed) == (493, 0, 7)
    assert rep.ok and rep.shards_written == 4
    bad = {3, 4, 5, 6, 7, 9, 10}
    keep = np.array([i not in bad for i in range(500)])
    _assert_round_trip(root, ids, lat, lon, emb, keep)
    fails = _failures(root)
    assert fails["r3"] == "latitude/longitude missing, NaN or infinite"
    assert fails["r4"] == "longitude outside [-180, 180]"
    assert fails["r5"] == "latitude outside [-90, 90]"
    assert fails["r6"] == "embedding has NaN/inf values"
    assert fails["r7"].startswith("embedding values beyond float16 range")
    assert fails["r8"] == "duplicate id within the source"
    assert fails[""] == "missing id"
    got = _read_store(root)
    assert got["r0"][0] == "test" and got["r1"][0] == "train"  # split column of the source
    assert got["r1"][4] == country[1]
    store = FeatureStore.open(root)
    assert store.label_columns == ("unique_country",) and store.dim == 24
    assert store.backbone.name == "streetclip" and store.sources[0]["kind"] == "import"
    assert store.verify().ok
    manifest_before = (root / "store.json").read_text()
    # Re-import: nothing new — no shard, no repeated failure rows.
    rep2 = import_embeddings(_cfg(tmp_path / "src.parquet", root, chunk_rows=64))
    assert (rep2.imported, rep2.skipped_existing, rep2.failed, rep2.failures_recorded) == (0, 493, 7, 0)
    after = json.loads((root / "store.json").read_text())
    assert after["shards"] == json.loads(manifest_before)["shards"]
    assert FeatureStore.open(root).num_failures() == 7


def test_reimport_does_not_decode_embeddings_of_stored_row_groups(tmp_path):
    ids, lat, lon, emb, _ = _data(300, 8)
    pq.write_table(
        pa.table({"id": ids, "lat": lat, "lon": lon, "emb": _fixed_list(emb)}),
        tmp_path / "a.parquet",
        row_group_size=100,
    )
    import_embeddings(_cfg(tmp_path / "a.parquet", tmp_path / "s"))
    ids2, lat2, lon2, emb2, _ = _data(50, 8, seed=1, prefix="new")
    both = pa.concat_tables(
        [
            pq.read_table(tmp_path / "a.parquet"),
            pa.table({"id": ids2, "lat": lat2, "lon": lon2, "emb": _fixed_list(emb2)}),
        ]
    )
    pq.write_table(both, tmp_path / "b.parquet", row_group_size=100)
    src = open_source(_cfg(tmp_path / "b.parquet", tmp_path / "s"))
    src.skip_index = FeatureStore.open(tmp_path / "s").id_index()
    src.dim = 8
    decoded = [c.emb.strides != (0, 0) for c in src.chunks()]
    assert decoded == [False, False, False, True]  # only the row group holding new ids is read in full
    rep = import_embeddings(_cfg(tmp_path / "b.parquet", tmp_path / "s"))
    assert (rep.imported, rep.skipped_existing) == (50, 300)
    _assert_round_trip(
        tmp_path / "s",
        np.concatenate([ids, ids2]),
        np.concatenate([lat, lat2]),
        np.concatenate([lon, lon2]),
        np.concatenate([emb, emb2]),
    )


def test_import_is_indistinguishable_from_an_embed_written_store(tmp_path):
    make_store(tmp_path / "embedded", 50, 16, label_columns=("unique_country",))
    ids, lat, lon, emb, country = _data(50, 16)
    pq.write_table(
        pa.table({"id": ids, "lat": lat, "lon": lon, "emb": _fixed_list(emb), "unique_country": country}),
        tmp_path / "a.parquet",
    )
    import_embeddings(_cfg(tmp_path / "a.parquet", tmp_path / "imported"))
    a, b = FeatureStore.open(tmp_path / "embedded"), FeatureStore.open(tmp_path / "imported")
    sa = pq.ParquetFile(a.shard_paths()[0])
    sb = pq.ParquetFile(b.shard_paths()[0])
    assert sa.schema_arrow.equals(sb.schema_arrow) and sb.schema_arrow.equals(
        store_schema(16, ["unique_country"])
    )
    enc = sb.metadata.row_group(0).column(sb.schema_arrow.names.index("emb"))
    assert not enc.has_dictionary_page and enc.compression == "ZSTD"
    assert set(json.loads((tmp_path / "imported" / "store.json").read_text())) == set(
        json.loads((tmp_path / "embedded" / "store.json").read_text())
    )
    assert all(len(r["sha256"]) == 64 for r in b.shard_records)


def test_parquet_list_column_with_ragged_rows_and_float64(tmp_path):
    ids, lat, lon, emb, _ = _data(60, 8)
    rows = [list(map(float, e)) for e in emb]
    rows[2] = rows[2][:5]  # wrong dimension
    rows[3] = None  # missing embedding
    pq.write_table(
        pa.table(
            {
                "key": ids,
                "latitude": lat,
                "longitude": lon,
                "embedding": pa.array(rows, pa.list_(pa.float64())),
            }
        ),
        tmp_path / "l.parquet",
    )
    rep = import_embeddings(_cfg(tmp_path / "l.parquet", tmp_path / "s", split="val"))
    assert (rep.imported, rep.failed) == (58, 2)
    fails = _failures(tmp_path / "s")
    assert fails == {"r2": "embedding has 5 values, store dimension is 8", "r3": "missing embedding"}
    keep = np.ones(60, bool)
    keep[[2, 3]] = False
    _assert_round_trip(tmp_path / "s", ids, lat, lon, emb, keep)
    assert FeatureStore.open(tmp_path / "s").rows_per_split() == {"val": 58}


def test_parquet_one_column_per_dimension_in_natural_order(tmp_path):
    ids, lat, lon, emb, _ = _data(40, 12)
    cols = {"image": ids, "y": lat, "x": lon}
    for j in np.random.default_rng(1).permutation(12):  # columns stored out of order: emb_10 before emb_2 ...
        cols[f"emb_{j}"] = emb[:, j]
    pq.write_table(pa.table(cols), tmp_path / "w.parquet")
    rep = import_embeddings(
        _cfg(
            tmp_path / "w.parquet", tmp_path / "s", emb_col="emb_*", id_col="image", lat_col="y", lon_col="x"
        )
    )
    assert rep.imported == 40 and FeatureStore.open(tmp_path / "s").dim == 12
    _assert_round_trip(tmp_path / "s", ids, lat, lon, emb)


def test_directory_of_parquet_files_and_new_source_adds_only_new_ids(tmp_path):
    ids, lat, lon, emb, _ = _data(300, 8)
    (tmp_path / "src").mkdir()
    for k, (a, b) in enumerate([(0, 100), (100, 200)]):
        pq.write_table(
            pa.table({"id": ids[a:b], "lat": lat[a:b], "lon": lon[a:b], "emb": _fixed_list(emb[a:b])}),
            tmp_path / "src" / f"part{k}.parquet",
        )
    root = tmp_path / "s"
    assert import_embeddings(_cfg(tmp_path / "src", root)).imported == 200
    # A second source overlapping the first (ids 150..299): only 200..299 are new.
    pq.write_table(
        pa.table({"id": ids[150:], "lat": lat[150:], "lon": lon[150:], "emb": _fixed_list(emb[150:])}),
        tmp_path / "more.parquet",
    )
    rep = import_embeddings(_cfg(tmp_path / "more.parquet", root, chunk_rows=32))
    assert (rep.imported, rep.skipped_existing, rep.failed) == (100, 50, 0)
    _assert_round_trip(root, ids, lat, lon, emb)
    store = FeatureStore.open(root)
    assert len(store.sources) == 2 and store.verify().ok


def test_an_unreadable_file_among_many_is_a_failure(tmp_path):
    ids, lat, lon, emb, _ = _data(30, 8)
    (tmp_path / "src").mkdir()
    pq.write_table(
        pa.table({"id": ids, "lat": lat, "lon": lon, "emb": _fixed_list(emb)}), tmp_path / "src" / "a.parquet"
    )
    (tmp_path / "src" / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"id": ["z"], "lat": [1.0]}), tmp_path / "src" / "c.parquet")  # no lon, no emb
    rep = import_embeddings(_cfg(tmp_path / "src", tmp_path / "s", max_failure_rate=1.0))
    assert (rep.imported, rep.failed) == (30, 2)
    t = FeatureStore.open(tmp_path / "s").failures_table().to_pylist()
    by_source = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in t}
    assert by_source["b.parquet:row 0"].startswith("unreadable Parquet file")
    assert by_source["c.parquet:row 0"].startswith("missing column(s) ['lon', 'emb']")


def test_embedding_column_of_the_wrong_type_is_refused_up_front(tmp_path):
    pq.write_table(
        pa.table({"id": ["a"], "lat": [1.0], "lon": [2.0], "emb": ["not a vector"]}), tmp_path / "a.parquet"
    )
    with pytest.raises(InputError, match="expected a list of numbers"):
        import_embeddings(_cfg(tmp_path / "a.parquet", tmp_path / "s"))
    assert not (tmp_path / "s" / "store.json").exists()


def test_dimension_mismatch_against_the_store_is_recorded_not_fatal(tmp_path):
    root = tmp_path / "s"
    make_store(root, 20, 16, backbone_name="streetclip", label_columns=())
    ids, lat, lon, emb, _ = _data(30, 8, prefix="new")
    pq.write_table(
        pa.table({"id": ids, "lat": lat, "lon": lon, "emb": _fixed_list(emb)}), tmp_path / "d.parquet"
    )
    rep = import_embeddings(_cfg(tmp_path / "d.parquet", root))
    assert (rep.imported, rep.failed) == (0, 30) and not rep.ok
    assert set(_failures(root).values()) >= {"embedding has 8 values, store dimension is 16"}
    assert FeatureStore.open(root).num_rows() == 20 and FeatureStore.open(root).verify().ok


def test_store_of_another_backbone_is_refused(tmp_path):
    make_store(tmp_path / "s", 10, 8, backbone_name="dinov2-l-reg")
    ids, lat, lon, emb, _ = _data(5, 8)
    pq.write_table(
        pa.table({"id": ids, "lat": lat, "lon": lon, "emb": _fixed_list(emb)}), tmp_path / "a.parquet"
    )
    with pytest.raises(StoreError, match="dinov2-l-reg"):
        import_embeddings(_cfg(tmp_path / "a.parquet", tmp_path / "s"))


def test_unknown_columns_give_one_line_errors(tmp_path):
    ids, lat, lon, emb, _ = _data(5, 8)
    pq.write_table(
        pa.table({"id": ids, "lat": lat, "lon": lon, "vec": _fixed_list(emb)}), tmp_path / "a.parquet"
    )
    with pytest.raises(InputError, match="--emb-col"):
        import_embeddings(_cfg(tmp_path / "a.parquet", tmp_path / "s"))
    with pytest.raises(InputError, match="label column"):
        import_embeddings(_cfg(tmp_path / "a.parquet", tmp_path / "s", emb_col="vec", labels=("city",)))
    with pytest.raises(InputError, match="no such file"):
        import_embeddings(_cfg(tmp_path / "missing.parquet", tmp_path / "s"))


# ------------------------------------------------------------------------------------------ NumPy
@pytest.mark.parametrize("meta_kind", ["csv", "parquet"])
def test_numpy_pair_round_trip(tmp_path, meta_kind):
    ids, lat, lon, emb, country = _data(700, 10)
    lat[11] = np.nan
    emb16 = emb.astype(np.float16)
    np.save(tmp_path / "feats.npy", emb16)
    meta = pa.table({"id": ids, "latitude": lat, "longitude": lon, "unique_country": country})
    if meta_kind == "csv":
        pacsv.write_csv(meta, tmp_path / "feats.csv")
    else:
        pq.write_table(meta, tmp_path / "feats.parquet")
    rep = import_embeddings(_cfg(tmp_path / "feats.npy", tmp_path / "s", chunk_rows=128))
    assert (rep.imported, rep.failed) == (699, 1)
    keep = np.ones(700, bool)
    keep[11] = False
    _assert_round_trip(tmp_path / "s", ids, lat, lon, emb16.astype(np.float32), keep)
    assert _read_store(tmp_path / "s")["r5"][4] == country[5]
    assert import_embeddings(_cfg(tmp_path / "feats.npy", tmp_path / "s")).imported == 0


def test_numpy_pair_with_mismatched_rows_or_corrupt_npy(tmp_path):
    ids, lat, lon, emb, _ = _data(20, 4)
    np.save(tmp_path / "e.npy", emb)
    pacsv.write_csv(pa.table({"id": ids[:19], "lat": lat[:19], "lon": lon[:19]}), tmp_path / "m.csv")
    with pytest.raises(InputError, match="row i of each"):
        import_embeddings(_cfg(tmp_path / "e.npy", tmp_path / "s", metadata=tmp_path / "m.csv"))
    (tmp_path / "bad.npy").write_bytes((tmp_path / "e.npy").read_bytes()[:150])
    with pytest.raises(InputError, match="corrupt or truncated"):
        import_embeddings(_cfg(tmp_path / "bad.npy", tmp_path / "s", metadata=tmp_path / "m.csv"))


def test_numpy_csv_with_unparsable_coordinates(tmp_path):
    np.save(tmp_path / "e.npy", np.ones((3, 4), np.float32))
    (tmp_path / "e.csv").write_text("id,lat,lon\na,10.5,20\nb,north,20\nc,-5,1e1\n")
    rep = import_embeddings(_cfg(tmp_path / "e.npy", tmp_path / "s"))
    assert (rep.imported, rep.failed) == (2, 1)
    assert _failures(tmp_path / "s") == {"b": "latitude/longitude missing, NaN or infinite"}
    assert _read_store(tmp_path / "s")["c"][2] == 10.0


# ------------------------------------------------------------------------------------------ webdataset
def _npy_bytes(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            key = s["__key__"]
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _osv_samples(ids, lat, lon, emb, country, start=0):
    out = []
    for i in range(len(ids)):
        meta = {
            "id": ids[i],
            "latitude": float(lat[i]),
            "longitude": float(lon[i]),
            "country": "xx",
            "unique_country": country[i],
            "unique_city": f"city{i % 3}" if i % 4 else float("nan"),
        }
        out.append(
            {
                "__key__": f"{start + i:08d}",
                "jpg": b"\xff\xd8not-really",
                "json": json.dumps(meta).encode(),
                "street_clip.npy": _npy_bytes(emb[i]),
                "dinov2_vitl14_registers.npy": _npy_bytes(emb[i, :4] * 2),
            }
        )
    return out


def test_webdataset_directory_round_trip_like_osv5m(tmp_path):
    ids, lat, lon, emb, country = _data(90, 16)
    samples = _osv_samples(ids, lat, lon, emb, country)
    (tmp_path / "wds").mkdir()
    for k in range(3):
        _write_tar(tmp_path / "wds" / f"{k:04d}.tar", samples[k * 30 : (k + 1) * 30])
    root = tmp_path / "s"
    rep = import_embeddings(_cfg(tmp_path / "wds", root, split="train", chunk_rows=25))
    assert (rep.imported, rep.failed) == (90, 0)
    _assert_round_trip(root, ids, lat, lon, emb)
    store = FeatureStore.open(root)
    assert store.label_columns == ("unique_country", "unique_city") and store.dim == 16
    got = _read_store(root)
    assert got["r1"][4:] == (country[1], "city1") and got["r4"][5] is None  # NaN label → null
    assert store.verify().ok
    again = import_embeddings(_cfg(str(tmp_path / "wds" / "*.tar"), root, split="train"))
    assert (again.imported, again.skipped_existing) == (0, 90)
    # The other embedding of the same shards, via --emb-key, into its own store.
    dino = import_embeddings(
        _cfg(
            tmp_path / "wds",
            tmp_path / "dino",
            backbone="dinov2-l-reg",
            emb_key="dinov2_vitl14_registers.npy",
        )
    )
    assert dino.imported == 90 and FeatureStore.open(tmp_path / "dino").dim == 4


def test_webdataset_bad_members_are_failures(tmp_path):
    ids, lat, lon, emb, country = _data(12, 8)
    s = _osv_samples(ids, lat, lon, emb, country)
    del s[0]["street_clip.npy"]  # no embedding member
    s[1]["street_clip.npy"] = b"\x93NUMPY garbage"  # corrupt npy
    s[2]["street_clip.npy"] = _npy_bytes(np.ones(5, np.float32))  # wrong dimension
    s[3]["json"] = b"{not json"  # unreadable metadata
    del s[4]["json"]  # no metadata
    s[5]["json"] = json.dumps({"lat": 95.0, "lon": 3.0}).encode()  # out of range, lat/lon keys, id from key
    s[6]["json"] = json.dumps({"lat": 45.0, "lon": 3.0}).encode()  # fine; id from the key
    s[6]["cls"] = b"17"
    s[7]["street_clip.npy"] = _npy_bytes(np.full((1, 8), np.nan, np.float32))  # (1, D) accepted, NaN refused
    s[8]["street_clip.npy"] = s[8]["street_clip.npy"][:-6]  # truncated npy (same header as the rest)
    _write_tar(tmp_path / "a.tar", s)
    rep = import_embeddings(_cfg(tmp_path / "a.tar", tmp_path / "st", chunk_rows=5, max_failure_rate=0.9))
    assert (rep.imported, rep.failed) == (4, 8)
    fails = _failures(tmp_path / "st")
    assert fails["r0"].startswith(
        "no street_clip.npy member (sample has: dinov2_vitl14_registers.npy, jpg, json"
    )
    assert fails["r1"].startswith("unreadable street_clip.npy member")
    assert fails["r2"] == "embedding has 5 values, store dimension is 8"
    assert fails["00000003"].startswith("unreadable .json member")
    assert fails["00000004"] == "no .json metadata member"
    assert fails["00000005"] == "latitude outside [-90, 90]"
    assert fails["r7"] == "embedding has NaN/inf values"
    assert fails["r8"].startswith("unreadable street_clip.npy member") and "truncated" in fails["r8"]
    got = _read_store(tmp_path / "st")
    assert "00000006" in got and got["00000006"][2] == 3.0
    assert FeatureStore.open(tmp_path / "st").label_columns == ("unique_country", "unique_city")


def test_webdataset_cls_label_and_truncated_tar(tmp_path):
    ids, lat, lon, emb, country = _data(40, 8)
    samples = _osv_samples(ids, lat, lon, emb, country)
    for i, smp in enumerate(samples):
        smp["cls"] = str(i % 3).encode()
    _write_tar(tmp_path / "good.tar", samples[:20])
    _write_tar(tmp_path / "cut.tar", samples[20:])
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 300])  # truncated mid-member
    rep = import_embeddings(_cfg(str(tmp_path / "*.tar"), tmp_path / "s", max_failure_rate=1.0))
    assert 20 < rep.imported < 40
    reasons = list(_failures(tmp_path / "s").values())
    assert any(r.startswith("unreadable tar data") for r in reasons)
    store = FeatureStore.open(tmp_path / "s")
    assert "cls" in store.label_columns
    assert _read_store(tmp_path / "s")["r4"][store.label_columns.index("cls") + 4] == "1"
    assert store.verify().ok


def test_a_source_with_nothing_usable_raises(tmp_path):
    _write_tar(tmp_path / "a.tar", [{"__key__": "x", "json": b"{}"}])
    with pytest.raises(InputError, match="no usable embedding"):
        import_embeddings(_cfg(tmp_path / "a.tar", tmp_path / "s"))


# ------------------------------------------------------------------------------ concurrent writers (issue 11)
def test_two_concurrent_importers_with_overlapping_ids_store_every_id_once(tmp_path):
    """Both importers are held at the writer lock, then released at the same instant: the second one to get
    the lock must see the first one's ids (the lock is taken before ids are read)."""
    import os
    import subprocess
    import sys
    import time

    from geoloc.pipeline.store import writer_lock

    ids, lat, lon, emb, _ = _data(9000, 16)
    for name, sl in (("a", slice(0, 6000)), ("b", slice(3000, 9000))):  # 3,000 ids in both files
        pq.write_table(
            pa.table({"id": ids[sl], "lat": lat[sl], "lon": lon[sl], "emb": _fixed_list(emb[sl])}),
            tmp_path / f"{name}.parquet",
        )
    root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs, errs = [], []
    with writer_lock(root, "test holder"):
        for name in ("a", "b"):
            err = tmp_path / f"{name}.err"
            errs.append(err)
            args = [
                sys.executable,
                "-m",
                "geoloc.cli",
                "store",
                "import",
                str(tmp_path / f"{name}.parquet"),
                "--store",
                str(root),
                "--backbone",
                "streetclip",
                "--no-progress",
                "--wait",
                "300",
                "--chunk-rows",
                "1000",
            ]
            procs.append(
                subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=err.open("w"), text=True)
            )
        deadline = time.monotonic() + 240
        while not all("test holder" in e.read_text() for e in errs):  # both are waiting at the lock
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.read_text() for e in errs]
    assert all("waiting up to 300 s" in e.read_text() for e in errs)
    store = FeatureStore.open(root)
    got = store.connect().sql("SELECT id FROM features").fetchall()
    assert len(got) == 9000 and len({r[0] for r in got}) == 9000  # every id exactly once
    assert store.verify().ok
    imported = sorted(int(o.split("imported ")[1].split(",")[0]) for o in outs)
    assert imported == [3000, 6000]  # the later one skipped the 3,000 ids the first had stored


def test_a_second_importer_without_wait_exits_with_one_line(tmp_path):
    from geoloc.pipeline.store import writer_lock

    ids, lat, lon, emb, _ = _data(20, 8)
    pq.write_table(
        pa.table({"id": ids, "lat": lat, "lon": lon, "emb": _fixed_list(emb)}), tmp_path / "a.parquet"
    )
    root = tmp_path / "store"
    with writer_lock(root, "`geoloc embed`"), pytest.raises(StoreError) as e:
        import_embeddings(_cfg(tmp_path / "a.parquet", root))
    assert "another `geoloc embed` (pid" in str(e.value) and "\n" not in str(e.value)
    assert not (root / "store.json").exists()  # nothing was written
    assert import_embeddings(_cfg(tmp_path / "a.parquet", root)).imported == 20  # lock gone with its holder


def _scramble_row_group(path: Path, rg: int, column: str = "emb") -> int:
    """Overwrite the middle of one row group's column chunk with random bytes; returns its row count."""
    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(i).path.split(".")[0] for i in range(md.num_columns)]
    col = md.row_group(rg).column(names.index(column))
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    size = col.total_compressed_size
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(1)
    data[start + 64 : start + size - 64] = rng.integers(0, 256, size - 128, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return md.row_group(rg).num_rows


def test_a_corrupt_row_group_counts_all_its_rows_and_trips_the_limit(tmp_path):
    ids, lat, lon, emb, _ = _data(10_000, 32)
    src = tmp_path / "src.parquet"
    pq.write_table(
        pa.table({"id": ids, "lat": lat, "lon": lon, "emb": _fixed_list(emb)}),
        src,
        row_group_size=2000,
        compression="zstd",
    )
    assert _scramble_row_group(src, 2) == 2000
    rep = import_embeddings(_cfg(src, tmp_path / "s", chunk_rows=500))
    assert (rep.rows_read, rep.imported, rep.failed, rep.lost_rows) == (10_000, 8000, 2000, 2000)
    assert rep.failure_rate == pytest.approx(0.2) and not rep.ok  # 20% > the 5% default limit
    assert "lost: 2000 row(s)" in rep.summary() and "src.parquet:row 4000" in rep.summary()
    (fail,) = FeatureStore.open(tmp_path / "s").failures_table().to_pylist()
    assert fail["source"].endswith("src.parquet:row 4000")
    assert "row group 2 skipped, 2000 row(s) lost (rows 4000–5999)" in fail["reason"]
    # Other row groups were still imported: rows after the corrupt one are in the store.
    assert {"r3999", "r6000", "r9999"} <= FeatureStore.open(tmp_path / "s").existing_ids()
    assert "r4000" not in FeatureStore.open(tmp_path / "s").existing_ids()


def test_a_truncated_file_of_unknown_size_trips_the_limit(tmp_path):
    ids, lat, lon, emb, _ = _data(3000, 8)
    (tmp_path / "d").mkdir()
    for k in range(3):
        sl = slice(1000 * k, 1000 * (k + 1))
        pq.write_table(
            pa.table({"id": ids[sl], "lat": lat[sl], "lon": lon[sl], "emb": _fixed_list(emb[sl])}),
            tmp_path / "d" / f"{k}.parquet",
        )
    data = (tmp_path / "d" / "1.parquet").read_bytes()
    (tmp_path / "d" / "1.parquet").write_bytes(data[: len(data) // 2])  # footer gone: size unknown
    rep = import_embeddings(_cfg(tmp_path / "d", tmp_path / "s"))
    assert (rep.imported, rep.lost_unknown) == (2000, 1)
    assert not rep.ok and "unknown size" in rep.summary()
