"""`geoloc predict` and the Python API behind it, on small checkpoints built in the test.

A vMF checkpoint whose heads are set to a known place (Paris) makes the answers checkable: whatever the
image, the estimate, the top mode and the nearest GeoNames place must be Paris. The image backbone is
``tiny-random`` (seeded random weights, no download); the text tests use the bundled MiniLM.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from geoloc.checkpoint import save_checkpoint
from geoloc.cli import app
from geoloc.config import FamilyConfig, ModelConfig, config_to_dict
from geoloc.errors import InputError
from geoloc.geolocator import Geolocator
from geoloc.pipeline.predict_job import PredictOptions, Predictor
from geoloc.sphere import haversine_km, latlon_to_xyz

runner = CliRunner()
PARIS = (48.8566, 2.3522)


def make_checkpoint(path, family="vmf", backbone="tiny-random", cond_dim=64, centre=PARIS, kappa=2e4):
    fam = FamilyConfig(name=family, cond_drop=0.0 if family == "vmf" else 0.1)
    model = ModelConfig(dim=16, depth=1, expansion=2)
    torch.manual_seed(0)
    geo = Geolocator.build(fam, model, cond_dim)
    with torch.no_grad():
        if family == "vmf":
            geo.net.mu_head[-1].weight.zero_()
            geo.net.mu_head[-1].bias.copy_(latlon_to_xyz(torch.tensor(centre)))
            geo.net.kappa_head[-1].weight.zero_()
            geo.net.kappa_head[-1].bias.fill_(kappa)
        else:
            for m in geo.net.modules():
                if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
                    torch.nn.init.normal_(m.weight, std=0.3)
                    torch.nn.init.normal_(m.bias, std=0.3)
    save_checkpoint(path, geo.net.state_dict(), {
        "family": config_to_dict(fam), "model": config_to_dict(model), "cond_dim": cond_dim,
        "backbone": {"name": backbone, "revision": "", "dim": cond_dim, "preprocessing": {}},
    })
    return path


def write_images(folder, n=3):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return folder


@pytest.fixture(scope="module")
def vmf_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "vmf")


def _run(*args):
    return runner.invoke(app, ["predict", *[str(a) for a in args]])


def test_folder_of_images_with_bad_files(tmp_path, vmf_ckpt):
    photos = write_images(tmp_path / "photos")
    r = _run(photos, tmp_path / "missing.jpg", "-c", vmf_ckpt, "--out", tmp_path / "p.csv", "--geojson",
             tmp_path / "p.geojson", "--samples", "32", "--steps", "4", "--no-progress", "--estimator", "sample")
    assert r.exit_code == 0, r.output
    assert "5 item(s), 3 located, 2 failed" in r.output
    assert "Paris" in r.output and "cannot decode image" in r.output and "no such file" in r.output
    import csv

    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 5
    ok = [row for row in rows if not row["error"]]
    assert len(ok) == 3
    for row in ok:
        assert haversine_km(np.array(PARIS), np.array([float(row["lat"]), float(row["lon"])])) < 1.0
        assert row["place_cc"] == "FR" and float(row["place_km"]) < 10
        assert float(row["mode1_mass"]) > 0.95 and row["mode1_place"].endswith("FR")
    gj = json.loads((tmp_path / "p.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    est = [f for f in gj["features"] if f["properties"].get("role") == "estimate"]
    lon, lat = est[0]["geometry"]["coordinates"]
    assert abs(lat - PARIS[0]) < 0.05 and abs(lon - PARIS[1]) < 0.05  # [lon, lat] order
    assert any(f["geometry"] is None and "decode" in f["properties"]["error"] for f in gj["features"])
    modes = [f for f in gj["features"] if f["properties"].get("role") == "mode"]
    assert modes and all(0 < f["properties"]["mass"] <= 1 for f in modes)


def test_manifest_items_carry_the_truth(tmp_path, vmf_ckpt):
    root = write_images(tmp_path / "data" / "images", n=2).parent
    (root / "test.csv").write_text(f"id,lat,lon,path\na,{PARIS[0]},{PARIS[1]},img0.png\n"
                                   "b,40.7128,-74.0060,img1.png\nc,10,10,nope.png\n")
    (tmp_path / "mine.toml").write_text(
        'name = "mine"\nkind = "folder"\nformat = "folder"\nroot = "data"\nlicence = "test"\n'
        'description = "t"\n[columns]\nid = "id"\nlat = "lat"\nlon = "lon"\nimage_path = "path"\n'
        '[splits.test]\ntable = "test.csv"\nimages = "images"\n')
    r = _run(tmp_path / "mine.toml", "--root", root, "-c", vmf_ckpt, "--out", tmp_path / "p.parquet",
             "--samples", "16", "--steps", "4", "--no-progress", "--split", "test",
             "--estimator", "sample")
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "p.parquet").to_pylist()
    by_id = {row["id"]: row for row in t}
    assert set(by_id) == {"a", "b", "c"}
    assert by_id["a"]["error_km"] < 1.0 and by_id["a"]["true_lat"] == pytest.approx(PARIS[0])
    assert by_id["b"]["error_km"] == pytest.approx(5837, rel=0.01)  # Paris → New York
    assert by_id["c"]["error"] and by_id["c"]["lat"] is None
    assert "error km" in r.output


def test_limit_and_all_failed_exit_code(tmp_path, vmf_ckpt):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    r = _run(tmp_path / "bad", "-c", vmf_ckpt, "--no-progress")
    assert r.exit_code == 1 and "empty file" in r.output
    many = write_images(tmp_path / "many", n=3)  # 4 files: broken.jpg, img0..2.png
    r = _run(many, "-c", vmf_ckpt, "--limit", "3", "--no-progress", "--show", "1", "--samples", "8", "--steps", "2")
    assert r.exit_code == 0 and "3 item(s), 2 located, 1 failed" in r.output and "2 more row(s)" in r.output
    r = _run(many, "-c", vmf_ckpt, "--no-progress", "--samples", "8", "--steps", "2", "-q")
    assert r.exit_code == 0 and "4 item(s)" in r.output and "Paris" not in r.output  # -q: no table


def test_user_errors_are_one_line(tmp_path, vmf_ckpt):
    r = _run("-c", vmf_ckpt, "--text", "Paris")
    assert isinstance(r.exception, InputError) and "text backbone" in str(r.exception)
    r = _run("-c", tmp_path, write_images(tmp_path / "i", 1))
    assert isinstance(r.exception, InputError) and "no config.json" in str(r.exception)
    r = _run("-c", vmf_ckpt)
    assert isinstance(r.exception, InputError) and "nothing to predict" in str(r.exception)
    (tmp_path / "empty").mkdir()
    r = _run("-c", vmf_ckpt, tmp_path / "empty")
    assert isinstance(r.exception, InputError) and "no images" in str(r.exception)


def test_density_maps_with_trajectories(tmp_path):
    ckpt = make_checkpoint(tmp_path / "rfm", family="rfm-s2")
    r = _run(write_images(tmp_path / "photos", 2), "-c", ckpt, "--maps", tmp_path / "maps", "--max-maps", "1",
             "--map-levels", "1", "--map-steps", "2", "--trajectories", "3", "--samples", "16", "--steps", "4",
             "--map-format", "both", "--no-progress", "--top-k", "2")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert files == ["001-img0.html", "001-img0.png"]  # item 0 (broken.jpg) failed: no map
    png = next((tmp_path / "maps").glob("*.png")).read_bytes()
    assert png[:4] == b"\x89PNG" and "wrote 2 map(s)" in r.output


def test_python_api_texts_and_embeddings():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        ckpt = make_checkpoint(Path(d) / "text", backbone="minilm", cond_dim=384, centre=(39.80, -89.64))
        predictor = Predictor.from_pretrained(ckpt)
        assert predictor.takes_text
        res = predictor.predict(["Springfield", "  ", "Paris"], top_k=2, samples=32, steps=4)
    assert [r.ok for r in res] == [True, False, True] and res[1].error == "empty text"
    assert res[0].id == "Springfield" and res[0].place.admin1 == "Illinois" and res[0].place.cc == "US"
    assert res[0].modes[0].mass > 0.9 and math.isclose(sum(m.mass for m in res[0].modes) + res[0].other_mass, 1.0)
    # Embeddings only: no backbone needed; options are a dataclass, overrides are keywords.
    bare = Predictor(predictor.geolocator)
    out = bare.predict_embeddings(np.zeros((3, 384), np.float32), ids=["x", "y", "z"],
                                  options=PredictOptions(top_k=1, samples=16, steps=2, places=False),
                                  estimator="median", keep_samples=True)
    assert [o.id for o in out] == ["x", "y", "z"] and out[0].place is None and out[0].samples.shape == (16, 3)
    assert haversine_km(np.array([39.80, -89.64]), np.array([out[0].lat, out[0].lon])) < 20
