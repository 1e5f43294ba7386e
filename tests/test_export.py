"""Exports of predictions: flat rows (CSV / Parquet), GeoJSON (RFC 7946) and the terminal table."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest

from geoloc.errors import ConfigError
from geoloc.export import format_table, prediction_rows, to_geojson, write_geojson, write_table
from geoloc.predict import ItemPrediction, Mode, Place


def _place(name, cc, lat, lon, km=1.5):
    return Place(
        name=name, admin1="Illinois" if cc == "US" else "", admin2="", cc=cc, lat=lat, lon=lon, distance_km=km
    )


@pytest.fixture
def predictions():
    spring = ItemPrediction(
        id="Springfield",
        input="Springfield",
        kind="text",
        lat=39.8,
        lon=-89.64,
        estimator="sample",
        modes=[
            Mode(39.8, -89.64, 0.55, _place("Springfield", "US", 39.8, -89.64)),
            Mode(37.2, -93.3, 0.30, _place("Springfield", "US", 37.2, -93.29)),
            Mode(42.1, -72.59, 0.10, None),
        ],
        other_mass=0.05,
        localizability_bits=3.25,
        place=_place("Springfield", "US", 39.8, -89.64),
    )
    photo = ItemPrediction(
        id="img/a.jpg",
        input="img/a.jpg",
        kind="image",
        lat=48.8566,
        lon=2.3522,
        estimator="median",
        modes=[Mode(48.8566, 2.3522, 1.0, _place("Paris", "FR", 48.85, 2.35))],
        other_mass=0.0,
        place=_place("Paris", "FR", 48.85, 2.35),
        true_lat=48.86,
        true_lon=2.35,
        error_km=0.42,
    )
    broken = ItemPrediction(
        id="img/b.jpg", input="img/b.jpg", kind="image", error="cannot decode image: truncated"
    )
    return [spring, photo, broken]


def test_rows_have_the_same_columns_in_every_row(predictions):
    rows = prediction_rows(predictions)
    assert [list(r) for r in rows] == [list(rows[0])] * 3
    assert list(rows[0])[:6] == ["id", "input", "kind", "lat", "lon", "estimator"]
    assert rows[0]["mode3_mass"] == 0.1 and rows[0]["mode3_place"] is None
    assert rows[1]["mode2_lat"] is None and rows[1]["error_km"] == 0.42
    assert rows[2]["lat"] is None and rows[2]["error"].startswith("cannot decode")
    assert rows[0]["place"] == "Springfield, Illinois, US" and rows[0]["place_cc"] == "US"
    assert len(prediction_rows(predictions, top_k=1)[0]) == len(rows[0]) - 8  # 4 columns per mode


def test_csv_and_parquet_round_trip(tmp_path, predictions):
    write_table(predictions, tmp_path / "p.csv")
    back = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["id"] for r in back] == ["Springfield", "img/a.jpg", "img/b.jpg"]
    assert float(back[0]["mode2_mass"]) == 0.3 and back[2]["lat"] == ""
    write_table(predictions, tmp_path / "p.parquet")
    t = pq.read_table(tmp_path / "p.parquet")
    assert str(t.schema.field("lat").type) == "double" and str(t.schema.field("id").type) == "string"
    assert t.column("mode1_mass").to_pylist() == [0.55, 1.0, None]
    assert t.column("error").to_pylist()[2].startswith("cannot decode")
    with pytest.raises(ConfigError, match=r"\.xlsx"):
        write_table(predictions, tmp_path / "p.xlsx")
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files


def test_geojson_points_are_lon_lat(tmp_path, predictions):
    gj = to_geojson(predictions)
    assert gj["type"] == "FeatureCollection"
    feats = gj["features"]
    assert len(feats) == (1 + 3) + (1 + 1) + 1
    est = feats[0]
    assert est["geometry"] == {"type": "Point", "coordinates": [-89.64, 39.8]}
    assert est["properties"]["role"] == "estimate" and est["properties"]["localizability_bits"] == 3.25
    modes = [
        f for f in feats if f["properties"].get("role") == "mode" and f["properties"]["id"] == "Springfield"
    ]
    assert [m["properties"]["rank"] for m in modes] == [1, 2, 3]
    assert [m["properties"]["mass"] for m in modes] == [0.55, 0.3, 0.1]
    photo = next(
        f for f in feats if f["properties"]["id"] == "img/a.jpg" and f["properties"]["role"] == "estimate"
    )
    assert photo["properties"]["error_km"] == 0.42 and photo["properties"]["true_lat"] == 48.86
    assert feats[-1]["geometry"] is None and feats[-1]["properties"]["role"] == "failed"
    assert "decode" in feats[-1]["properties"]["error"]
    for f in feats:  # RFC 7946: every Feature has type, geometry (or null) and properties
        assert f["type"] == "Feature" and "properties" in f and "geometry" in f
        if f["geometry"]:
            lon, lat = f["geometry"]["coordinates"]
            assert -180 <= lon <= 180 and -90 <= lat <= 90
    path = write_geojson(predictions, tmp_path / "p.geojson")
    assert json.loads(path.read_text()) == json.loads(json.dumps(gj))


def test_terminal_table(predictions):
    text = format_table(predictions, top_k=2)
    lines = text.splitlines()
    assert lines[0].split() == ["id", "estimate", "place", "#1", "#2", "loc", "bits", "error", "km"]
    assert "55% Springfield, Illinois, US" in lines[1] and "3.25" in lines[1]
    assert lines[2].rstrip().endswith("0") and "100% Paris, FR" in lines[2]
    assert "error: cannot decode image: truncated" in lines[3]
    assert all("\x1b" not in line for line in lines)  # no colour codes


def test_density_cells_export_as_geojson_and_parquet(tmp_path):
    import numpy as np
    import torch

    from geoloc.density import density_map
    from geoloc.export import write_density
    from tests.test_density import vmf_geolocator

    m = density_map(
        vmf_geolocator([(10.0, 179.9)], [2000.0]), torch.zeros(4), generator=torch.Generator().manual_seed(0)
    )
    gj = json.loads(write_density(m, tmp_path / "d.geojson").read_text())
    feats = gj["features"]
    assert len(feats) == len(m)
    assert sum(f["properties"]["mass"] for f in feats) == pytest.approx(m.total_mass, rel=1e-6)
    split = [f for f in feats if f["geometry"]["type"] == "MultiPolygon"]
    assert split  # cells on the antimeridian are cut there (RFC 7946 §3.1.9)
    for f in feats:
        polys = (
            f["geometry"]["coordinates"]
            if f["geometry"]["type"] == "MultiPolygon"
            else [f["geometry"]["coordinates"]]
        )
        for ring in (r for poly in polys for r in poly):
            assert ring[0] == ring[-1] and all(-180 <= x <= 180 and -90 <= y <= 90 for x, y in ring)
    t = pq.read_table(write_density(m, tmp_path / "d.parquet"))
    assert t.num_rows == len(m) and t.column("cell").to_pylist() == m.cells.tolist()
    region = np.array(t.column("region").to_pylist(), dtype=float)
    mass = np.array(t.column("mass").to_pylist())
    assert mass[region == 0.5].sum() / mass.sum() == pytest.approx(0.5, abs=0.03)
    assert mass[region <= 0.9].sum() / mass.sum() == pytest.approx(0.9, abs=0.03)
    with pytest.raises(ConfigError, match="density format"):
        write_density(m, tmp_path / "d.csv")
