"""Readers on tiny real datasets built in tmp dirs: exact items, coordinates, labels and failure reasons."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from geoloc.errors import ManifestError
from geoloc.pipeline.items import Failure, Item
from geoloc.pipeline.manifests import load_manifest
from geoloc.pipeline.readers import count_items, iter_items, unit_hash


def _img(fmt: str = "JPEG", color: tuple = (200, 30, 30), size: tuple = (8, 6)) -> bytes:
    buf = io.BytesIO()
    mode = "RGBA" if fmt == "PNG" else "RGB"
    Image.new(mode, size, color + ((128,) if mode == "RGBA" else ())).save(buf, format=fmt)
    return buf.getvalue()


def _manifest(tmp: Path, text: str, root: Path | None = None):
    path = tmp / "m.toml"
    path.write_text(text)
    return load_manifest(path, root=root if root is not None else tmp / "data")


def _split(records):
    records = list(records)
    items = [r for r in records if isinstance(r, Item)]
    fails = [r for r in records if isinstance(r, Failure)]
    return items, fails


FOLDER_TOML = """
name = "t"
kind = "folder"
format = "folder"
root = "unused"
[columns]
id = "id"
lat = "lat"
lon = "lon"
image_path = "path"
labels = ["country"]
[splits.train]
table = "train.csv"
images = "images"
"""


@pytest.fixture
def folder_ds(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images" / "sub").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(_img())
    (root / "images" / "sub" / "b.png").write_bytes(_img("PNG"))
    (root / "images" / "na.jpg").write_bytes(_img())
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "dup.jpg").write_bytes(_img())
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(_img())
    os.symlink(outside, root / "images" / "link.jpg")
    (root / "train.csv").write_text(
        "id,path,lat,lon,country\n"
        "a,a.jpg,48.85,2.35,FR\n"  # row 1: good JPEG
        "b,sub/b.png,-33.9,151.2,\n"  # row 2: good PNG, empty label -> None
        "c,c.jpg,nan,10,DE\n"  # row 3: NaN latitude
        "d,missing.jpg,1,2,DE\n"  # row 4: file not found
        "a,dup.jpg,3,4,FR\n"  # row 5: duplicate id
        "na,na.jpg,-22.56,17.08,NA\n"  # row 6: Namibia stays "NA"
        "e,a.jpg,,5,FR\n"  # row 7: no latitude
        "f,a.jpg,10,181,FR\n"  # row 8: longitude out of range
        "g,../outside.jpg,10,10,FR\n"  # row 9: escapes the root
        "h,link.jpg,10,10,FR\n"  # row 10: symlink resolving outside the root
        "i,empty.jpg,10,10,FR\n"  # row 11: empty file
        "j,a.jpg,inf,10,FR\n"  # row 12: infinite latitude
    )
    return tmp_path


def test_folder_csv_items_and_failures(folder_ds: Path) -> None:
    m = _manifest(folder_ds, FOLDER_TOML)
    records = list(iter_items(m))
    items, fails = _split(records)
    assert [i.id for i in items] == ["a", "b", "na"]
    assert [(i.lat, i.lon) for i in items] == [(48.85, 2.35), (-33.9, 151.2), (-22.56, 17.08)]
    assert [i.labels for i in items] == [{"country": "FR"}, {"country": None}, {"country": "NA"}]
    assert items[0].payload == (folder_ds / "data/images/a.jpg").read_bytes()
    assert items[1].payload[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(i.kind == "image" and i.split == "train" for i in items)
    assert items[1].source == "images/sub/b.png"
    got = {(f.id, f.source): f.reason for f in fails}
    assert len(fails) == 9 and len(records) == 12
    assert "not finite" in got[("c", "train.csv:row 3")]
    assert "not found" in got[("d", "train.csv:row 4")] and "missing.jpg" in got[("d", "train.csv:row 4")]
    assert got[("a", "train.csv:row 5")].startswith("duplicate id 'a'")
    assert got[("e", "train.csv:row 7")].startswith("no coordinates")
    assert "out of range" in got[("f", "train.csv:row 8")]
    assert "escapes the dataset root" in got[("g", "train.csv:row 9")]
    assert "outside the dataset root" in got[("h", "train.csv:row 10")]
    assert "empty file" in got[("i", "train.csv:row 11")]
    assert "not finite" in got[("j", "train.csv:row 12")]
    assert count_items(m) == 12


def test_skip_ids_are_not_read(folder_ds: Path) -> None:
    m = _manifest(folder_ds, FOLDER_TOML)
    # "d" points at a missing file: skipping it must not even look at the file (no failure).
    items, fails = _split(iter_items(m, skip_ids={"a", "d", "c"}))
    assert [i.id for i in items] == ["b", "na"]
    assert {f.id for f in fails} == {
        "e",
        "f",
        "g",
        "h",
        "i",
        "j",
    }  # the duplicate of a skipped id is skipped too


def test_folder_parquet_table_numeric_columns(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    for n in (7, 8):
        (root / "img" / f"{n}.jpg").write_bytes(_img())
    pq.write_table(
        pa.table(
            {
                "photo": [7, 8, 9],
                "la": [10.5, -80.25, float("nan")],
                "lo": [20.0, 170.0, 1.0],
                "cc": ["NA", None, "X"],
            }
        ),
        root / "meta.parquet",
    )
    m = _manifest(
        tmp_path,
        """
name = "p"
kind = "folder"
format = "folder"
root = "x"
[columns]
id = "photo"
lat = "la"
lon = "lo"
image_path = "img/{photo}.jpg"
labels = ["cc"]
[splits.train]
table = "meta.parquet"
""",
    )
    items, fails = _split(iter_items(m))
    assert [(i.id, i.lat, i.lon, i.labels["cc"]) for i in items] == [
        ("7", 10.5, 20.0, "NA"),
        ("8", -80.25, 170.0, None),
    ]
    assert [(f.id, f.source) for f in fails] == [("9", "meta.parquet:row 3")]
    assert "not finite" in fails[0].reason


def test_text_reader_and_hash_split(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    rows = ["lat,lon,name"] + [f"{(i % 170) - 85},{(i * 7) % 360 - 180},place {i}" for i in range(200)]
    rows.append("1,1,")  # empty text (row 201)
    (root / "places.csv").write_text("\n".join(rows) + "\n")
    text = """
name = "txt"
kind = "text"
format = "text"
root = "x"
[columns]
id = "p-{_row:04d}"
lat = "lat"
lon = "lon"
text = "name"
[label_templates]
upper = "{name}!"
[splits.train]
table = "places.csv"
fraction = [0.0, 0.8]
[splits.test]
table = "places.csv"
fraction = [0.8, 1.0]
"""
    m = _manifest(tmp_path, text)
    train = list(iter_items(m, ["train"]))
    test = list(iter_items(m, ["test"]))
    ids_train = {r.id for r in train}
    ids_test = {r.id for r in test}
    assert not ids_train & ids_test and len(ids_train) + len(ids_test) == 201
    assert ids_train == {f"p-{i:04d}" for i in range(1, 202) if unit_hash(f"p-{i:04d}") < 0.8}
    assert count_items(m, ["train"]) == len(train) and count_items(m, ["test"]) == len(test)
    everything = list(iter_items(m))
    by_id = {r.id: r for r in everything}
    assert by_id["p-0001"].payload == "place 0" and by_id["p-0001"].kind == "text"
    assert by_id["p-0001"].labels == {"upper": "place 0!"}
    assert (by_id["p-0001"].lat, by_id["p-0001"].lon) == (-85.0, -180.0)
    assert isinstance(by_id["p-0201"], Failure) and by_id["p-0201"].reason.startswith("empty text")
    # limit: a deterministic subsample taken before the split, partitioned by the fractions
    ml = load_manifest(tmp_path / "m.toml", root=root, limit=50)
    sub = [r.id for r in iter_items(ml)]
    assert len(sub) == 50 == len(set(sub)) and sub == [r.id for r in iter_items(ml)]
    assert set(sub) <= set(by_id)


ZIP_TOML = """
name = "z"
kind = "osv5m"
format = "zip"
root = "x"
[columns]
id = "id"
lat = "latitude"
lon = "longitude"
labels = ["country", "unique_city"]
[splits.test]
table = "test.csv"
images = "images/test/*.zip"
"""


@pytest.fixture
def zip_ds(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images" / "test").mkdir(parents=True)
    with zipfile.ZipFile(root / "images/test/00.zip", "w") as z:
        z.writestr("00/101.jpg", _img(color=(1, 2, 3)))
        z.writestr("00/102.jpg", _img(color=(4, 5, 6)))
        z.writestr("00/", b"")
    with zipfile.ZipFile(root / "images/test/01.zip", "w") as z:
        z.writestr("103.jpg", _img(color=(7, 8, 9)))
        z.writestr("105.jpg", b"")
        z.writestr("999.jpg", _img())  # no metadata row: not an item
    (root / "images/test/02.zip").write_bytes(b"this is not a zip")
    good = _img(color=(9, 9, 9))
    with zipfile.ZipFile(root / "images/test/03.zip", "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("106.jpg", good)
    raw = bytearray((root / "images/test/03.zip").read_bytes())
    at = raw.index(good) + len(good) // 2
    raw[at] ^= 0xFF  # flip one byte of the stored data: CRC mismatch on read
    (root / "images/test/03.zip").write_bytes(bytes(raw))
    (root / "test.csv").write_text(
        "id,latitude,longitude,country,unique_city\n"
        "103,-43.8,-176.6,NZ,Waitangi_NaN_Chatham Islands_NZ\n"
        "101,1.5,2.5,NA,Katima Mulilo_NaN_Zambezi_NA\n"
        "104,3,4,FR,\n"  # no member in any archive
        "102,NaN,4,FR,x\n"
        "105,5,6,FR,y\n"  # empty member
        "3859149887465501,10,10,NZ,z\n"  # a 16-digit id stays exact text; not in any archive
        "106,7,7,FR,w\n"  # member with a bad CRC
    )
    return tmp_path


def test_zip_members_by_name(zip_ds: Path) -> None:
    m = _manifest(zip_ds, ZIP_TOML)
    records = list(iter_items(m))
    items, fails = _split(records)
    # archive order (00.zip then 01.zip), member order inside each archive
    assert [i.id for i in items] == ["101", "103"]
    assert (
        items[0].source == "images/test/00.zip:00/101.jpg" and items[1].source == "images/test/01.zip:103.jpg"
    )
    assert Image.open(io.BytesIO(items[0].payload)).getpixel((0, 0))[:3] != (0, 0, 0)
    assert items[0].labels == {"country": "NA", "unique_city": "Katima Mulilo_NaN_Zambezi_NA"}
    assert (items[1].lat, items[1].lon) == (-43.8, -176.6)
    reasons = {f.id: f.reason for f in fails}
    assert "cannot open zip archive" in reasons[""]
    assert "not finite" in reasons["102"]
    assert "empty file" in reasons["105"]
    assert reasons["104"].startswith("image not found: no member '104.jpg'")
    assert "3859149887465501" in reasons
    assert "cannot read zip member" in reasons["106"] and "CRC" in reasons["106"]
    assert count_items(m) == 7
    items2, _ = _split(iter_items(m, skip_ids={"101"}))
    assert [i.id for i in items2] == ["103"]


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


WDS_TOML = """
name = "w"
kind = "osv5m"
format = "wds"
root = "x"
[columns]
id = "__key__"
lat = "latitude"
lon = "longitude"
labels = ["unique_country"]
[splits.train]
images = "train/*.tar"
"""


@pytest.fixture
def wds_ds(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)

    def meta(lat: float, lon: float, cc: str | None = "FR") -> bytes:
        return json.dumps({"latitude": lat, "longitude": lon, "unique_country": cc}).encode()

    _tar(
        root / "train/0000.tar",
        [
            ("s1", {"jpg": _img(), "json": meta(10.0, 20.0), "street_clip.npy": b"\x93NUMPY"}),
            ("s2", {"png": _img("PNG"), "json": meta(-5, 5, "NA")}),
            ("s3", {"jpg": _img(), "json": b'{"latitude": NaN, "longitude": 3}'}),
            ("s4", {"json": meta(1, 1)}),
            ("s5", {"webp": _img("WEBP"), "json": meta(2, 2, None)}),
        ],
    )
    _tar(
        root / "train/0001.tar",
        [
            ("s6", {"jpeg": _img(), "json": meta(3, 3)}),
            ("s1", {"jpg": _img(), "json": meta(0, 0)}),
            ("s7", {"jpg": _img()}),
        ],
    )
    return tmp_path


def test_wds_samples_grouped_by_key(wds_ds: Path) -> None:
    m = _manifest(wds_ds, WDS_TOML)
    items, fails = _split(iter_items(m))
    assert [(i.id, i.lat, i.lon, i.labels["unique_country"]) for i in items] == [
        ("s1", 10.0, 20.0, "FR"),
        ("s2", -5.0, 5.0, "NA"),
        ("s5", 2.0, 2.0, None),
        ("s6", 3.0, 3.0, "FR"),
    ]
    assert items[0].source == "train/0000.tar:s1.jpg" and items[1].payload[:4] == b"\x89PNG"
    assert [(f.id, f.reason.split(" (")[0]) for f in fails] == [
        ("s3", "latitude nan is not finite"),
        ("s4", "sample has no image member"),
        ("s1", "duplicate id 's1'"),
        ("s7", "sample has no .json metadata"),
    ]
    assert count_items(m) == 8
    (wds_ds / "data/train/sizes.json").write_text(json.dumps({"0000.tar": 5, "0001.tar": 3}))
    assert count_items(m) == 8
    items, fails = _split(iter_items(m, skip_ids={"s1", "s3", "s7"}))
    assert [i.id for i in items] == ["s2", "s5", "s6"] and [f.id for f in fails] == ["s4"]


def test_wds_truncated_shard_keeps_good_samples(wds_ds: Path) -> None:
    shard = wds_ds / "data/train/0001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: 512 + 300])  # header of the first member, then cut inside its data
    m = _manifest(wds_ds, WDS_TOML)
    items, fails = _split(iter_items(m))
    assert [i.id for i in items] == ["s1", "s2", "s5"]
    assert any(f.source == "train/0001.tar" and "unreadable" in f.reason for f in fails)


def test_parquet_image_bytes_and_row_group_skipping(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    img = _img()
    t1 = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "lat": [1.0, 2.0, 3.0, None],
            "lon": [1.0, 2.0, 3.0, 4.0],
            "image": pa.array([img, img, None, img], pa.binary()),
            "country": ["NA", "FR", "FR", "FR"],
        }
    )
    pq.write_table(t1, root / "train-0.parquet", row_group_size=2)
    struct = pa.array(
        [{"bytes": img, "path": "e.jpg"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    t2 = pa.table({"id": ["e"], "lat": [5.0], "lon": [5.0], "image": struct, "country": [None]})
    pq.write_table(t2, root / "train-1.parquet")
    (root / "train-2.parquet").write_bytes(b"PAR1 not really")
    m = _manifest(
        tmp_path,
        """
name = "pq"
kind = "custom"
format = "parquet"
root = "x"
[columns]
labels = ["country"]
[splits.train]
images = "train-*.parquet"
""",
    )
    items, fails = _split(iter_items(m))
    assert [(i.id, i.lat, i.labels["country"], i.payload == img) for i in items] == [
        ("a", 1.0, "NA", True),
        ("b", 2.0, "FR", True),
        ("e", 5.0, None, True),
    ]
    assert [(f.id, f.source) for f in fails] == [
        ("c", "train-0.parquet:row 3"),
        ("d", "train-0.parquet:row 4"),
        ("", "train-2.parquet"),
    ]
    assert "no image bytes" in fails[0].reason and fails[1].reason.startswith("no coordinates")
    assert "Parquet file unreadable" in fails[2].reason
    assert count_items(m) == 6
    items, fails = _split(iter_items(m, skip_ids={"a", "b", "d"}))
    assert [i.id for i in items] == ["e"] and [f.id for f in fails] == ["c", ""]


def test_coco_inat_style(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "val" / "00001_Animalia").mkdir(parents=True)
    for n in (1, 2, 3):
        (root / "val" / "00001_Animalia" / f"{n}.jpg").write_bytes(_img())
    coco = {
        "images": [
            {"id": 1, "file_name": "val/00001_Animalia/1.jpg", "latitude": 45.5, "longitude": -73.5},
            {"id": 2, "file_name": "val/00001_Animalia/2.jpg", "latitude": None, "longitude": None},
            {"id": 3, "file_name": "val/00001_Animalia/3.jpg", "latitude": float("nan"), "longitude": 1.0},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7},
            {"id": 11, "image_id": 2, "category_id": 7},
        ],
        "categories": [{"id": 7, "name": "Alces alces", "kingdom": "Animalia", "supercategory": "Mammals"}],
    }
    (root / "val.json").write_text(json.dumps(coco).replace("NaN", "NaN"))
    m = _manifest(
        tmp_path,
        """
name = "inat"
kind = "inat21"
format = "folder"
root = "x"
[columns]
id = "id"
lat = "latitude"
lon = "longitude"
image_path = "file_name"
labels = ["category_id", "name", "kingdom", "supercategory"]
[splits.val]
table = "val.json"
""",
    )
    items, fails = _split(iter_items(m))
    assert [(i.id, i.lat, i.lon) for i in items] == [("1", 45.5, -73.5)]
    assert items[0].labels == {
        "category_id": "7",
        "name": "Alces alces",
        "kingdom": "Animalia",
        "supercategory": "Mammals",
    }
    assert [f.id for f in fails] == ["2", "3"] and all(f.reason.startswith("no coordinates") for f in fails)
    assert count_items(m) == 3


YFCC_TOML = """
name = "y"
kind = "yfcc100m"
format = "folder"
root = "x"
[table]
format = "tsv"
header = false
quote = ""
names = ["photo_id", "title", "longitude", "latitude", "accuracy", "marker"]
[columns]
id = "photo_id"
lat = "latitude"
lon = "longitude"
image_path = "{hash[0:3]}/{hash[3:6]}/{hash}.jpg"
labels = ["accuracy", "title"]
[splits.train]
table = "yfcc100m_dataset"
images = "images"
require_coordinates = true
equals = { marker = "0" }
at_least = { accuracy = 12 }
exclude_ids = "yfcc4k_ids.txt"
[splits.train.join]
table = "yfcc100m_hash"
format = "tsv"
header = false
names = ["photo_id", "hash"]
left_on = "photo_id"
right_on = "photo_id"
columns = ["hash"]
"""


def test_yfcc_tsv_join_and_filters(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    rows = [
        ("1", 'a "quoted" title', "2.35", "48.85", "16", "0"),  # kept
        ("2", "video", "2.35", "48.85", "16", "1"),  # video: dropped
        ("3", "coarse", "2.35", "48.85", "11", "0"),  # accuracy 11: dropped
        ("4", "no geotag", "", "", "", "0"),  # not geotagged: dropped silently
        ("5", "yfcc4k", "10", "10", "16", "0"),  # a YFCC4k id: excluded
        ("6", "no image", "-70.1", "-33.4", "12", "0"),  # kept, image missing -> failure
        ("7", "bad lat", "10", "95", "14", "0"),  # kept, latitude out of range -> failure
        ("8", "no hash", "10", "10", "14", "0"),  # kept, no hash row -> failure (no image path)
    ]
    (root / "yfcc100m_dataset").write_text("".join("\t".join(r) + "\n" for r in rows))
    hashes = {str(i): f"{i:03d}abc{i}ef" + "0" * 22 for i in range(1, 8)}
    (root / "yfcc100m_hash").write_text("".join(f"{k}\t{v}\n" for k, v in hashes.items()))
    (root / "yfcc4k_ids.txt").write_text("5\n\n")
    p = root / "images" / hashes["1"][:3] / hashes["1"][3:6]
    p.mkdir(parents=True)
    (p / f"{hashes['1']}.jpg").write_bytes(_img())
    m = _manifest(tmp_path, YFCC_TOML)
    items, fails = _split(iter_items(m))
    assert [(i.id, i.lat, i.lon, i.labels) for i in items] == [
        ("1", 48.85, 2.35, {"accuracy": "16", "title": 'a "quoted" title'})
    ]
    assert items[0].source == f"images/001/abc/{hashes['1']}.jpg"
    reasons = {f.id: f.reason for f in fails}
    assert set(reasons) == {"6", "7", "8"}
    assert (
        "not found" in reasons["6"]
        and "out of range" in reasons["7"]
        and reasons["8"].startswith("no image path")
    )
    assert count_items(m) == 4


def test_dataset_level_errors(folder_ds: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"dataset root .* not found; pass --root"):
        iter_items(_manifest(folder_ds, FOLDER_TOML, root=tmp_path / "nowhere"))  # raised eagerly
    bad_col = FOLDER_TOML.replace('lat = "lat"', 'lat = "lattitude"')
    with pytest.raises(
        ManifestError, match=r"column 'lattitude' \(columns.lat\) not found \(did you mean 'lat'\?\)"
    ):
        list(iter_items(_manifest(folder_ds, bad_col)))
    with pytest.raises(ManifestError, match=r"column 'country' \(label 'country'\) not found"):
        (folder_ds / "data/train.csv").write_text("id,path,lat,lon\na,a.jpg,1,1\n")
        count_items(_manifest(folder_ds, FOLDER_TOML))
    with pytest.raises(ManifestError, match=r"table .*nope.csv not found"):
        list(iter_items(_manifest(folder_ds, FOLDER_TOML.replace("train.csv", "nope.csv"))))
    with pytest.raises(ManifestError, match=r"no split 'trian' \(did you mean 'train'\?\)"):
        list(iter_items(_manifest(folder_ds, FOLDER_TOML), ["trian"]))


def test_zip_no_archives_is_a_manifest_error(zip_ds: Path) -> None:
    m = _manifest(zip_ds, ZIP_TOML.replace("images/test/*.zip", "images/val/*.zip"))
    with pytest.raises(ManifestError, match=r"no zip archives match 'images/val/\*.zip'"):
        list(iter_items(m))


def test_table_symlink_outside_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "secret.csv").write_text("id,path,lat,lon,country\n")
    os.symlink(tmp_path / "secret.csv", root / "train.csv")
    with pytest.raises(ManifestError, match="resolves outside the dataset root"):
        list(iter_items(_manifest(tmp_path, FOLDER_TOML)))


def test_demo_geonames_reads_the_real_table() -> None:
    m = load_manifest("demo-geonames")
    assert count_items(m) == 144_563
    records = list(iter_items(m))
    assert len(records) == 144_563
    train = {r.id for r in records if r.split == "train"}
    test = {r.id for r in records if r.split == "test"}
    assert not train & test and len(train) + len(test) == 144_563
    assert 0.94 < len(train) / 144_563 < 0.96
    assert test == {f"gn-{i:06d}" for i in range(1, 144_564) if unit_hash(f"gn-{i:06d}") >= 0.95}
    items = [r for r in records if isinstance(r, Item)]
    fails = [r for r in records if isinstance(r, Failure)]
    assert len(fails) == 2 and all(f.reason.startswith("empty text") for f in fails)  # two unnamed places
    first = items[0]
    assert (first.id, first.payload, first.lat, first.lon) == ("gn-000001", "El Tarter", 42.57952, 1.65362)
    assert first.labels == {
        "unique_country": "AD",
        "unique_region": "Canillo_AD",
        "unique_sub-region": None,
        "unique_city": "El Tarter_NaN_Canillo_AD",
    }
    namibia = [i for i in items if i.labels["unique_country"] == "NA"]
    assert len(namibia) > 10 and namibia[0].labels["unique_region"].endswith("_NA")
    springfields = [i for i in items if i.payload == "Springfield"]
    assert len(springfields) >= 15 and len({i.labels["unique_region"] for i in springfields}) >= 10
    assert all(math.isfinite(i.lat) and abs(i.lat) <= 90 for i in items)
