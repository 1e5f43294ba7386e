"""Manifest loading and validation: shipped manifests, clear one-line errors, templates, root handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from geoloc.errors import ManifestError
from geoloc.pipeline.manifests import MANIFEST_DIRS, Template, list_manifests, load_manifest

BASE = """
name = "t"
kind = "folder"
format = "folder"
root = "data"
licence = "MIT"
description = "test"
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


def _load(tmp_path: Path, text: str, **kw):
    p = tmp_path / "m.toml"
    p.write_text(text)
    return load_manifest(p, **kw)


def test_shipped_manifests_load() -> None:
    assert MANIFEST_DIRS[0].name == "data_manifests"
    names = list_manifests()
    for required in ("osv5m", "inat21", "yfcc4k", "yfcc100m", "folder-example", "demo-geonames"):
        assert required in names
    for n in names:
        m = load_manifest(n)
        assert m.name and m.splits and m.licence and m.description and len(m.sha256) == 64
    osv = load_manifest("osv5m")
    assert osv.format == "zip" and list(osv.splits) == ["train", "test"]
    assert osv.label_columns == (
        "country", "region", "sub-region", "city",
        "unique_country", "unique_region", "unique_sub-region", "unique_city",
    )  # fmt: skip
    assert osv.columns["member"].render({"id": "3859149887465501"}) == "3859149887465501.jpg"
    yfcc = load_manifest("yfcc100m")
    tr = yfcc.splits["train"]
    assert tr.table.names[10:13] == ("longitude", "latitude", "accuracy") and tr.table.names[22] == "marker"
    assert tr.at_least == (("accuracy", 12.0),) and tr.equals == (("marker", "0"),)
    assert tr.exclude_ids == "yfcc4k_ids.txt" and tr.join.columns == ("hash",)
    assert yfcc4k_positions() == (1, 12, 13)
    demo = load_manifest("demo-geonames")
    assert (demo.root / "rg_cities1000.csv").is_file() and demo.format == "text"


def yfcc4k_positions() -> tuple[int, int, int]:
    names = load_manifest("yfcc4k").splits["test"].table.names
    return names.index("photo_id"), names.index("longitude"), names.index("latitude")


def test_root_override_and_fingerprint(tmp_path: Path) -> None:
    m = _load(tmp_path, BASE)
    assert m.root == (Path.cwd() / "data").resolve()
    m2 = _load(tmp_path, BASE, root=tmp_path / "elsewhere")
    assert m2.root == (tmp_path / "elsewhere").resolve() and m2.sha256 != m.sha256
    assert _load(tmp_path, BASE, root=tmp_path / "elsewhere").sha256 == m2.sha256
    assert _load(tmp_path, BASE, limit=10).sha256 != m.sha256
    assert _load(tmp_path, BASE, limit=10).limit == 10 and m.limit is None
    assert m.label_columns == ("country",) and m.kind_of_item == "image"
    assert m.path == (tmp_path / "m.toml").resolve()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("licence", "license"), "unknown key 'license' (did you mean 'licence'?)"),
        (
            ('image_path = "path"', 'imagepath = "path"'),
            "unknown key 'imagepath' (did you mean 'image_path'?)",
        ),
        (('table = "train.csv"', 'tabel = "train.csv"'), "unknown key 'tabel' (did you mean 'table'?)"),
        (('name = "t"\n', ""), "missing required key 'name'"),
        (('image_path = "path"\n', ""), "missing required key 'image_path' for format 'folder'"),
        (('table = "train.csv"\n', ""), "missing required key 'table'"),
        (('format = "folder"', 'format = "foldr"'), "unknown format 'foldr' (did you mean 'folder'?)"),
        (('kind = "folder"', 'kind = "osv5"'), "unknown kind 'osv5' (did you mean 'osv5m'?)"),
        (('table = "train.csv"', 'table = "../train.csv"'), "escapes the dataset root ('..')"),
        (('table = "train.csv"', 'table = "/etc/passwd.csv"'), "is absolute"),
        (('images = "images"', 'images = "images/../../x"'), "escapes the dataset root"),
        (('table = "train.csv"', 'table = "train.xlsx"'), "cannot tell the format of table 'train.xlsx'"),
        (('id = "id"', 'id = "{id"'), "cannot parse template"),
        (('id = "id"', "id = 3"), "expected a non-empty string"),
        (('labels = ["country"]', 'labels = ["split"]'), "clash with the store's own columns"),
        (('images = "images"', 'images = "images"\nfraction = [0.5, 0.2]'), "'fraction' must be [lo, hi]"),
        (('root = "data"', "root = 5"), "key 'root' must be a str"),
        (
            ('root = "data"', 'root = "pkg:no_such_package_xyz"'),
            "Python package 'no_such_package_xyz' is not installed",
        ),
        (('images = "images"', 'images = "images/*.jpg"'), "may not be a glob"),
    ],
)
def test_validation_errors(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in BASE
    text = BASE.replace(old, new, 1)
    with pytest.raises(ManifestError) as e:
        _load(tmp_path, text)
    assert message in str(e.value)
    assert "\n" not in str(e.value) and str(tmp_path / "m.toml") in str(e.value)


def test_split_structure_errors(tmp_path: Path) -> None:
    overlap = BASE + '\n[splits.test]\ntable = "train.csv"\nimages = "images"\nfraction = [0.5, 1.0]\n'
    with pytest.raises(ManifestError, match="overlapping fractions"):
        _load(
            tmp_path, overlap.replace('images = "images"\n', 'images = "images"\nfraction = [0.0, 0.6]\n', 1)
        )
    ok = overlap.replace('images = "images"\n', 'images = "images"\nfraction = [0.0, 0.5]\n', 1)
    assert list(_load(tmp_path, ok).splits) == ["train", "test"]
    zip_text = BASE.replace('format = "folder"', 'format = "zip"').replace('images = "images"\n', "")
    with pytest.raises(ManifestError, match="missing required key 'images'"):
        _load(tmp_path, zip_text.replace('image_path = "path"\n', ""))
    with pytest.raises(ManifestError, match="limit needs a metadata table"):
        wds_text = (
            BASE.replace('format = "folder"', 'format = "wds"')
            .replace('image_path = "path"\n', "")
            .replace('table = "train.csv"\n', "")
            .replace('"images"', '"*.tar"')
        )
        _load(tmp_path, wds_text, limit=5)
    with pytest.raises(ManifestError, match="header = false needs 'names'"):
        _load(tmp_path, BASE + "[table]\nheader = false\n")
    with pytest.raises(ManifestError, match="not valid TOML"):
        _load(tmp_path, BASE + "[[[")
    with pytest.raises(ManifestError, match=r"\[splits\] is empty"):
        _load(tmp_path, BASE.split("[splits.train]")[0] + "[splits]\n")


def test_unknown_manifest_name_suggests() -> None:
    with pytest.raises(ManifestError, match=r"unknown manifest 'osv5' \(did you mean 'osv5m'\?\)"):
        load_manifest("osv5")
    with pytest.raises(ManifestError, match=r"manifest file .*nope.toml not found"):
        load_manifest("nope.toml")


def test_templates() -> None:
    city = Template.parse("{name}_{admin2|NaN}_{admin1}_{cc}", "t")
    assert city.columns == ("name", "admin2", "admin1", "cc")
    assert (
        city.render({"name": "Waitangi", "admin2": "", "admin1": "Chatham Islands", "cc": "NZ"})
        == "Waitangi_NaN_Chatham Islands_NZ"
    )
    sub = Template.parse("{admin2}_{admin1}_{cc}", "t")
    assert sub.render({"admin2": None, "admin1": "x", "cc": "NZ"}) is None
    h = Template.parse("{hash[0:3]}/{hash[3:6]}/{hash}.jpg", "t")
    assert h.render({"hash": "abcdef123"}) == "abc/def/abcdef123.jpg"
    assert Template.parse("gn-{_row:06d}", "t").render({"_row": 42}) == "gn-000042"
    bare = Template.parse("sub-region", "t")
    assert bare.is_column and bare.render({"sub-region": 5}) == "5" and bare.render({}) is None
    assert not h.is_column
    assert Template.parse("{x}", "t").render({"x": float("nan")}) is None
