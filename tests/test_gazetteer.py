"""The gazetteer reproduces reverse_geocoder 1.5.1's nearest-place labels exactly, with or without a table."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from geoloc.errors import InputError, StoreError
from geoloc.gazetteer import (
    LEVELS,
    RG_CSV_SHA256,
    TABLE_FORMAT,
    Gazetteer,
    LabelTable,
    _children,
    _dense_index,
    _pentagon_base_cells,
    h3_cells,
    load_or_build_table,
    load_places,
    rg_csv_path,
)

TEST_RES = 4  # a small table (≈3 s to build) that still exercises the trie walk; the default is 6


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gazetteer-cache")


@pytest.fixture(scope="session")
def gaz(cache_dir) -> Gazetteer:
    return Gazetteer.load(cache_dir=cache_dir, resolution=TEST_RES)


def _uniform(rng, n):
    z = rng.uniform(-1, 1, n)
    return np.c_[np.degrees(np.arcsin(z)), rng.uniform(-180, 180, n)]


def _jitter(rng, latlon, max_km):
    """Points within ``max_km`` of ``latlon`` (approximately; wrapped into the lat/lon box)."""
    ang = rng.uniform(0, 2 * np.pi, len(latlon))
    r = rng.uniform(0, max_km, len(latlon)) / 111.195
    lat = np.clip(latlon[:, 0] + r * np.sin(ang), -90, 90)
    lon = latlon[:, 1] + r * np.cos(ang) / np.maximum(np.cos(np.radians(lat)), 1e-3)
    return np.c_[lat, (lon + 180) % 360 - 180]


def _boundary_points(rng, gaz: Gazetteer, level: str, n: int) -> np.ndarray:
    """Midpoints of nearby place pairs whose labels differ at ``level``, exactly and nudged across."""
    coords = gaz.places.latlon
    ids = gaz.ids[level]
    _, nb = gaz.tree.query(coords[rng.choice(len(coords), 4 * n, replace=False)], k=8)
    a, b = nb[:, 0].repeat(7), nb[:, 1:].ravel()
    differ = ids[a] != ids[b]
    a, b = a[differ][:n], b[differ][:n]
    mid = (coords[a] + coords[b]) / 2
    step = coords[b] - coords[a]
    nudges = [mid] + [mid + s * step * eps for eps in (1e-12, 1e-9, 1e-6, 1e-3) for s in (-1, 1)]
    return np.vstack(nudges)


def _assert_same_labels(gaz: Gazetteer, pts: np.ndarray, levels=(*LEVELS, "place")) -> None:
    fast = gaz.resolve(pts, levels)
    exact = gaz.resolve(pts, levels, use_table=False)
    for lv in levels:
        bad = np.flatnonzero(fast.ids[lv] != exact.ids[lv])
        assert bad.size == 0, f"{lv}: {bad.size} of {len(pts)} differ, e.g. {pts[bad[:3]].tolist()}"


def test_places_are_reverse_geocoders_file():
    places = load_places()
    assert len(places) == 144_563
    assert places.sha256 == RG_CSV_SHA256
    assert (places.cc == "NA").sum() > 0  # Namibia stays a string, not a missing value
    assert (places.admin2 == "").mean() == pytest.approx(0.419, abs=0.001)  # docs/eval-protocol.md §5
    assert len(np.unique(places.cc)) == 246


def test_changed_place_file_is_refused(tmp_path):
    raw = rg_csv_path().read_bytes()
    bad = tmp_path / "rg_cities1000.csv"
    bad.write_bytes(raw.replace(b"Waitangi", b"Waitangy"))
    assert hashlib.sha256(bad.read_bytes()).hexdigest() != RG_CSV_SHA256
    with pytest.raises(StoreError, match="sha256"):
        load_places(bad)
    with pytest.raises(StoreError, match="cannot read"):
        load_places(tmp_path / "missing.csv")


def test_published_example_row(gaz):
    # The OSV-5M loader's example test row (docs/eval-protocol.md §1.3): admin2 is empty, keys keep the empty
    # field.
    info = gaz.describe(int(gaz.nearest(np.array([[-43.8048, -176.6141]]))[0]))
    assert (info["name"], info["admin1"], info["admin2"], info["cc"]) == (
        "Waitangi",
        "Chatham Islands",
        "",
        "NZ",
    )
    assert info["region"] == "Chatham Islands_NZ"
    assert info["sub-region"] == "_Chatham Islands_NZ"
    assert info["city"] == "Waitangi__Chatham Islands_NZ"


def test_exact_rule_matches_reverse_geocoder_search(gaz):
    rg = pytest.importorskip("reverse_geocoder")
    rng = np.random.default_rng(0)
    coords = gaz.places.latlon
    _, inv, counts = np.unique(coords, axis=0, return_inverse=True, return_counts=True)
    dup_rows = np.flatnonzero(counts[inv.ravel()] > 1)  # places sharing coordinates: tie-breaks matter
    pts = np.vstack(
        [_uniform(rng, 1500), _jitter(rng, coords[rng.integers(0, len(coords), 1500)], 3.0), coords[dup_rows]]
    )
    found = rg.search([tuple(p) for p in pts.tolist()], verbose=False)  # default mode 2, as OSV-5M ran it
    theirs = [(r["name"], r["admin1"], r["admin2"], r["cc"]) for r in found]
    p = gaz.places
    for idx in (gaz.nearest_exact(pts), gaz.nearest(pts)):
        assert [(p.name[i], p.admin1[i], p.admin2[i], p.cc[i]) for i in idx] == theirs


_RG_MODE1 = """
import sys, json, reverse_geocoder as rg
pts = json.load(sys.stdin)
out = rg.search([tuple(p) for p in pts], mode=1, verbose=False)
json.dump([[r[k] for k in ("name", "admin1", "admin2", "cc")] for r in out], sys.stdout)
"""


def _rg_search(pts: np.ndarray, mode: int) -> list[tuple[str, ...]]:
    """reverse_geocoder.search's (name, admin1, admin2, cc) per point in ``mode``. Its RGeocoder is a
    process-wide singleton (the first call's mode sticks), so mode 1 runs in a child process."""
    if mode == 2:
        rg = pytest.importorskip("reverse_geocoder")
        found = rg.search([tuple(p) for p in pts.tolist()], mode=2, verbose=False)
        return [(r["name"], r["admin1"], r["admin2"], r["cc"]) for r in found]
    import json
    import subprocess
    import sys

    pytest.importorskip("reverse_geocoder")
    run = subprocess.run(
        [sys.executable, "-c", _RG_MODE1],
        input=json.dumps(pts.tolist()),
        capture_output=True,
        text=True,
        check=True,
    )
    return [tuple(r) for r in json.loads(run.stdout)]


def _tie_points(gaz: Gazetteer, n: int) -> np.ndarray:
    """Points decided by tie-breaks: every duplicated place coordinate, midpoints of near place pairs with
    different city labels, and points moved along those pairs' bisectors (exact ties where the float
    arithmetic is exact, which is often for GeoNames' 5-decimal coordinates)."""
    rng = np.random.default_rng(13)
    coords = gaz.places.latlon
    _, inv, counts = np.unique(coords, axis=0, return_inverse=True, return_counts=True)
    _, nb = gaz.tree.query(coords, k=4)
    a, b = nb[:, 0].repeat(3), nb[:, 1:].ravel()
    keep = np.flatnonzero((gaz.ids["city"][a] != gaz.ids["city"][b]) & (a < b))
    pick = rng.choice(keep, n, replace=False)
    a, b = a[pick], b[pick]
    d = coords[b] - coords[a]
    t = rng.integers(-4, 5, n)[:, None] / 8.0
    bisector = (coords[a] + coords[b]) / 2 + t * np.c_[-d[:, 1], d[:, 0]]
    return np.vstack([coords[counts[inv.ravel()] > 1], (coords[a] + coords[b]) / 2, bisector])


def _fields(gaz: Gazetteer, idx: np.ndarray) -> list[tuple[str, ...]]:
    p = gaz.places
    return [(p.name[i], p.admin1[i], p.admin2[i], p.cc[i]) for i in idx]


def test_ties_break_as_reverse_geocoder_in_each_mode(gaz):
    """Among equidistant places, reverse_geocoder returns the first its KD-tree meets: mode 2 (its default,
    leafsize 30) and mode 1 (leafsize 16) differ there, and we match each, on the table and the KD path."""
    examples = np.array([[55.71667, 37.41667], [-35.03333, 138.56667]])  # issue 14: duplicated coordinates
    pts = np.vstack([examples, _tie_points(gaz, 1500)])
    theirs = {mode: _rg_search(pts, mode) for mode in (2, 1)}
    assert [t[:2] for t in theirs[2][:2]] == [
        ("Bol'shaya Setun'", "Moskovskaya"),
        ("Bedford Park", "South Australia"),
    ]
    assert [t[:2] for t in theirs[1][:2]] == [("Setun'", "Moscow"), ("Darlington", "South Australia")]
    differ = sum(a != b for a, b in zip(theirs[1], theirs[2], strict=True))
    assert differ > 100  # the points really are ties that the two modes break differently
    gaz1 = Gazetteer(gaz.places, gaz.table, rg_mode=1)
    for g, mode in ((gaz, 2), (gaz1, 1)):
        assert _fields(g, g.nearest_exact(pts)) == theirs[mode], f"KD path, mode {mode}"
        assert _fields(g, g.nearest(pts)) == theirs[mode], f"table path, mode {mode}"
        city = g.key_strings(g.resolve(pts, ("city",)).ids["city"], "city").tolist()
        assert city == [f"{n}_{a2}_{a1}_{cc}" for n, a1, a2, cc in theirs[mode]]
    with pytest.raises(InputError, match="rg_mode"):
        Gazetteer(gaz.places, rg_mode=3)


KINDS = ["uniform", "gt-like", "prediction-like", "places", "antimeridian", "poles"]


@pytest.mark.parametrize("kind", KINDS)
def test_table_agrees_with_exact_rule(gaz, kind):
    rng = np.random.default_rng(KINDS.index(kind))
    coords = gaz.places.latlon
    n = 40_000
    if kind == "uniform":
        pts = _uniform(rng, n)
    elif kind == "gt-like":
        pts = _jitter(rng, coords[rng.integers(0, len(coords), n)], 3.0)
    elif kind == "prediction-like":
        base = _jitter(rng, coords[rng.integers(0, len(coords), n)], 3.0)
        off = np.exp(rng.uniform(0, np.log(2000), n)) / 111.195
        ang = rng.uniform(0, 2 * np.pi, n)
        lat = np.clip(base[:, 0] + off * np.sin(ang), -90, 90)
        pts = np.c_[lat, (base[:, 1] + off * np.cos(ang) + 180) % 360 - 180]
    elif kind == "places":
        pts = coords  # exactly on every place, duplicates included
    elif kind == "antimeridian":
        q = n // 4
        lon = np.concatenate(
            [np.full(q, 180.0), np.full(q, -180.0), rng.uniform(179, 180, q), rng.uniform(-180, -179, q)]
        )
        pts = np.c_[rng.uniform(-70, 75, len(lon)), lon]
    else:
        lat = np.concatenate([rng.uniform(89, 90, n // 2), rng.uniform(-90, -89, n // 2), [90, -90, 90, -90]])
        pts = np.c_[lat, rng.uniform(-180, 180, len(lat))]
    _assert_same_labels(gaz, pts)


@pytest.mark.parametrize("level", [*LEVELS, "place"])
def test_table_agrees_near_label_boundaries(gaz, level):
    rng = np.random.default_rng(7)
    pts = _boundary_points(rng, gaz, "city" if level == "place" else level, 2000)
    _assert_same_labels(gaz, pts)


def test_table_answers_most_points(gaz):
    rng = np.random.default_rng(3)
    res = gaz.resolve(_uniform(rng, 50_000), ("country", "region"))
    assert res.n_exact / 50_000 < 0.2  # ≈12% at resolution 4, ≈2% at the default 6 (bench_gazetteer.py)


def test_invalid_and_out_of_box_points(gaz):
    pts = np.array([[np.nan, 0.0], [0.0, np.inf], [95.0, 10.0], [10.0, 200.0], [-43.8048, -176.6141]])
    res = gaz.resolve(pts, LEVELS)
    assert res.n_invalid == 2
    assert (res.ids["country"][:2] == -1).all()
    # Off the box the raw rule still applies (reverse_geocoder queries the raw numbers).
    exact = gaz.tree.query(pts[2:4])[1]
    assert (res.ids["city"][2:4] == gaz.ids["city"][exact]).all()
    countries = gaz.keys["country"][gaz.ids["country"][exact]].tolist()
    assert gaz.key_strings(res.ids["country"], "country").tolist() == ["", "", *countries, "NZ"]
    with pytest.raises(InputError):
        gaz.resolve(np.zeros((3, 3)))
    with pytest.raises(InputError, match="unknown label level"):
        gaz.resolve(pts, ("continent",))


def test_cache_is_reused_and_rebuilt_when_stale(gaz, cache_dir, tmp_path):
    path = LabelTable.cache_path(cache_dir, TEST_RES)
    assert path.name == f"gazetteer-{RG_CSV_SHA256[:16]}-r{TEST_RES}-v{TABLE_FORMAT}.npz"
    table, again, built = load_or_build_table(gaz, cache_dir, TEST_RES)
    assert not built and again == path
    assert table.nodes.tobytes() == gaz.table.nodes.tobytes()  # NaN centres of unused slots: compare bytes
    assert np.array_equal(table.child, gaz.table.child)
    # A table of another resolution or place file is never mistaken for this one; a corrupt file is rebuilt.
    with pytest.raises(StoreError):
        LabelTable.load(path, RG_CSV_SHA256, TEST_RES + 1)
    with pytest.raises(StoreError):
        LabelTable.load(path, "0" * 64, TEST_RES)
    broken = LabelTable.cache_path(tmp_path, 3)
    broken.write_bytes(b"not a table")
    with pytest.raises(StoreError, match="unreadable"):
        load_or_build_table(gaz, tmp_path, 3, build=False)
    table3, _, built3 = load_or_build_table(gaz, tmp_path, 3)
    assert built3 and table3.resolution == 3
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(StoreError, match="no gazetteer table"):
        load_or_build_table(gaz, tmp_path / "empty", 3, build=False)


def test_h3_bit_helpers_match_h3():
    from h3.api import basic_int

    rng = np.random.default_rng(5)
    pentagons = [basic_int.cell_to_center_child(p, 4) for p in basic_int.get_pentagons(0)]
    cells = np.concatenate([h3_cells(_uniform(rng, 300), 4), np.array(pentagons, dtype=np.uint64)])
    kids, exists = _children(cells, 4, _pentagon_base_cells())
    for i, c in enumerate(cells.tolist()):
        want = sorted(basic_int.cell_to_children(c, 5))
        assert sorted(kids[7 * i : 7 * i + 7][exists[7 * i : 7 * i + 7]].tolist()) == want
    # The dense index is a bijection between resolution-r cells and (base cell, digits).
    all3 = np.array(
        [c for c0 in basic_int.get_res0_cells() for c in basic_int.cell_to_children(c0, 3)], dtype=np.uint64
    )
    dense = _dense_index(all3, 3)
    assert len(np.unique(dense)) == len(all3) and dense.max() < 122 * 7**3


def test_polars_and_scalar_h3_agree(monkeypatch):
    import geoloc.gazetteer as gz

    rng = np.random.default_rng(11)
    pts = np.vstack([_uniform(rng, 2000), [[90, 0], [-90, 0], [0, 180], [0, -180]]])
    fast = gz.h3_cells(pts, 6)
    monkeypatch.setattr(gz, "_polars_h3", lambda: None)
    assert np.array_equal(fast, gz.h3_cells(pts, 6))


def test_cli_lookup_and_build(cache_dir):
    import json

    from typer.testing import CliRunner

    from geoloc.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["gazetteer", "lookup", "-22.56", "17.08", "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)["nearest"]
    assert info["cc"] == "NA" and info["country"] == "NA"
    out = runner.invoke(
        app, ["gazetteer", "build", "--cache-dir", str(cache_dir), "--resolution", str(TEST_RES)]
    )
    assert out.exit_code == 0, out.output
    assert out.output.startswith("cached")


@pytest.mark.slow
def test_default_resolution_table_agrees(tmp_path_factory):
    """The shipped configuration (resolution 6, ≈40 s to build) on every kind of point."""
    gaz6 = Gazetteer.load(cache_dir=tmp_path_factory.mktemp("res6"))
    assert gaz6.table.resolution == 6
    rng = np.random.default_rng(6)
    coords = gaz6.places.latlon
    gt = _jitter(rng, coords[rng.integers(0, len(coords), 100_000)], 3.0)
    pts = np.vstack(
        [
            _uniform(rng, 100_000),
            gt,
            _jitter(rng, gt, 500.0),
            coords,
            *(_boundary_points(rng, gaz6, lv, 2000) for lv in LEVELS),
            np.c_[
                rng.uniform(-70, 75, 20_000),
                rng.choice([-180.0, 180.0], 20_000) + rng.normal(0, 0.01, 20_000),
            ],
        ]
    )
    pts[:, 1] = np.clip(pts[:, 1], -180, 180)
    _assert_same_labels(gaz6, pts)
