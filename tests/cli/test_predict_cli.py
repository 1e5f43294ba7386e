"""`geoloc predict` and the Python API behind it, on small checkpoints built in the test.

A vMF checkpoint whose heads are set to a known place (Paris) makes the answers checkable: whatever the
image, the estimate, the top mode and the nearest GeoNames place must be Paris. The image backbone is
``tiny-random`` (seeded random weights, no download); the text tests use the bundled MiniLM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    save_checkpoint(
        path,
        geo.net.state_dict(),
        {
            "family": config_to_dict(fam),
            "model": config_to_dict(model),
            "cond_dim": cond_dim,
            "backbone": {"name": backbone, "revision": "", "dim": cond_dim, "preprocessing": {}},
        },
    )
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
    r = _run(
        photos,
        tmp_path / "missing.jpg",
        "-c",
        vmf_ckpt,
        "--out",
        tmp_path / "p.csv",
        "--geojson",
        tmp_path / "p.geojson",
        "--samples",
        "32",
        "--steps",
        "4",
        "--no-progress",
        "--estimator",
        "sample",
        "--max-failure-rate",
        "0.5",
    )  # 2 of 5 fail: within this limit, so exit 0
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
    (root / "test.csv").write_text(
        f"id,lat,lon,path\na,{PARIS[0]},{PARIS[1]},img0.png\nb,40.7128,-74.0060,img1.png\nc,10,10,nope.png\n"
    )
    (tmp_path / "mine.toml").write_text(
        'name = "mine"\nkind = "folder"\nformat = "folder"\nroot = "data"\nlicence = "test"\n'
        'description = "t"\n[columns]\nid = "id"\nlat = "lat"\nlon = "lon"\nimage_path = "path"\n'
        '[splits.test]\ntable = "test.csv"\nimages = "images"\n'
    )
    r = _run(
        tmp_path / "mine.toml",
        "--root",
        root,
        "-c",
        vmf_ckpt,
        "--out",
        tmp_path / "p.parquet",
        "--samples",
        "16",
        "--steps",
        "4",
        "--no-progress",
        "--split",
        "test",
        "--estimator",
        "sample",
        "--max-failure-rate",
        "0.5",
    )
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
    r = _run(
        many,
        "-c",
        vmf_ckpt,
        "--limit",
        "3",
        "--no-progress",
        "--show",
        "1",
        "--samples",
        "8",
        "--steps",
        "2",
        "--max-failure-rate",
        "0.5",
    )
    assert r.exit_code == 0 and "3 item(s), 2 located, 1 failed" in r.output and "2 more row(s)" in r.output
    r = _run(
        many,
        "-c",
        vmf_ckpt,
        "--no-progress",
        "--samples",
        "8",
        "--steps",
        "2",
        "-q",
        "--max-failure-rate",
        "0.5",
    )
    assert r.exit_code == 0 and "4 item(s)" in r.output and "Paris" not in r.output  # -q: no table


def test_three_of_four_failing_is_a_failed_run_that_still_writes_the_good_one(tmp_path, vmf_ckpt):
    # Issue 11: a folder where 3 of 4 images cannot be used exited 0. Now each failure is one line naming the
    # item and the reason, every failure is a row of the outputs, the good answer is written, and the exit
    # code is 1 (more than --max-failure-rate of the items failed).
    photos = write_images(tmp_path / "photos", n=1)  # img0.png + broken.jpg
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.jpg").write_text("a text file named .jpg by mistake\n")
    args = [
        photos,
        "-c",
        vmf_ckpt,
        "--out",
        tmp_path / "p.csv",
        "--samples",
        "8",
        "--steps",
        "2",
        "--no-progress",
        "-q",
    ]
    r = _run(*args)
    assert r.exit_code == 1, r.output
    assert "4 item(s), 1 located, 3 failed" in r.output
    lines = [line.strip() for line in r.output.splitlines() if line.strip().startswith("failed ")]
    assert sorted(lines) == [
        f"failed {photos / 'broken.jpg'}: cannot decode image: Truncated File Read",
        f"failed {photos / 'empty.png'}: empty file (0 bytes)",
        f"failed {photos / 'notes.jpg'}: cannot decode image: cannot identify image file",
    ]
    assert "error: 3 of 4 items failed (75.00%, above the 5.00% of --max-failure-rate)" in r.output
    import csv

    rows = {Path(row["id"]).name: row for row in csv.DictReader((tmp_path / "p.csv").open())}
    assert set(rows) == {"img0.png", "broken.jpg", "empty.png", "notes.jpg"}
    assert rows["img0.png"]["error"] == "" and abs(float(rows["img0.png"]["lat"]) - PARIS[0]) < 0.5
    assert rows["empty.png"]["error"] == "empty file (0 bytes)" and rows["empty.png"]["lat"] == ""
    assert rows["notes.jpg"]["error"].startswith("cannot decode image")
    # The limit is the user's: 75% is within 0.8, not within 0.7; 0 refuses any failure.
    assert _run(*args, "--max-failure-rate", "0.8").exit_code == 0
    assert _run(*args, "--max-failure-rate", "0.7").exit_code == 1
    ok_only = tmp_path / "ok"
    ok_only.mkdir()
    (photos / "img0.png").rename(ok_only / "img0.png")
    assert _run(ok_only, *args[1:], "--max-failure-rate", "0").exit_code == 0


def test_bad_manifest_rows_are_named_and_fail_the_run(tmp_path, vmf_ckpt):
    root = write_images(tmp_path / "data" / "images", n=1).parent
    (root / "test.csv").write_text(
        f"id,lat,lon,path\na,{PARIS[0]},{PARIS[1]},img0.png\nb,1,2,nope.png\nc,3,4,broken.jpg\n"
    )
    (tmp_path / "mine.toml").write_text(
        'name = "mine"\nkind = "folder"\nformat = "folder"\nroot = "data"\nlicence = "test"\n'
        'description = "t"\n[columns]\nid = "id"\nlat = "lat"\nlon = "lon"\nimage_path = "path"\n'
        '[splits.test]\ntable = "test.csv"\nimages = "images"\n'
    )
    r = _run(
        tmp_path / "mine.toml",
        "--root",
        root,
        "-c",
        vmf_ckpt,
        "--format",
        "jsonl",
        "--samples",
        "8",
        "--steps",
        "2",
        "--no-progress",
    )
    assert r.exit_code == 1
    assert "3 item(s), 1 located, 2 failed" in r.stderr
    failed = [line.strip() for line in r.stderr.splitlines() if line.strip().startswith("failed ")]
    assert [line.split(":")[0].split(" (")[0] for line in failed] == ["failed b", "failed c"]
    assert "nope.png" in failed[0] and "broken.jpg" in failed[1] and "decode" in failed[1]
    answers = {a["id"]: a for a in map(json.loads, r.stdout.splitlines())}
    assert answers["a"]["error"] is None and answers["a"]["lat"] == pytest.approx(PARIS[0], abs=0.5)
    assert answers["b"]["error"] and answers["c"]["error"]


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
    r = _run(
        write_images(tmp_path / "photos", 2),
        "-c",
        ckpt,
        "--maps",
        tmp_path / "maps",
        "--max-maps",
        "1",
        "--map-levels",
        "1",
        "--map-steps",
        "2",
        "--trajectories",
        "3",
        "--samples",
        "16",
        "--steps",
        "4",
        "--map-format",
        "both",
        "--no-progress",
        "--top-k",
        "2",
        "--max-failure-rate",
        "0.5",
    )
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
    assert res[0].modes[0].mass > 0.9 and math.isclose(
        sum(m.mass for m in res[0].modes) + res[0].other_mass, 1.0
    )
    # Embeddings only: no backbone needed; options are a dataclass, overrides are keywords.
    bare = Predictor(predictor.geolocator)
    out = bare.predict_embeddings(
        np.zeros((3, 384), np.float32),
        ids=["x", "y", "z"],
        options=PredictOptions(top_k=1, samples=16, steps=2, places=False),
        estimator="median",
        keep_samples=True,
    )
    assert [o.id for o in out] == ["x", "y", "z"] and out[0].place is None and out[0].samples.shape == (16, 3)
    assert haversine_km(np.array([39.80, -89.64]), np.array([out[0].lat, out[0].lon])) < 20


# --------------------------------------------------------------------------- issue 14 §3: a CLI that fits
SPRINGFIELD = (39.80, -89.64)
LONG = "a place name far longer than eighty characters, so that its id is a slug and its text lives in query"


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "text", backbone="minilm", cond_dim=384, centre=SPRINGFIELD
    )


_FAST = ("--samples", "16", "--steps", "2", "--top-k", "2")


def test_text_queries_keep_their_text_in_every_output(tmp_path, text_ckpt):
    from geoloc.pipeline.items import Item

    (tmp_path / "t.txt").write_text("Paris\n\n  \nSpringfield\n", encoding="utf-8")
    r = _run(
        "-c",
        text_ckpt,
        "--text",
        LONG,
        "--text-file",
        tmp_path / "t.txt",
        *_FAST,
        "--no-progress",
        "--out",
        tmp_path / "p.csv",
        "--geojson",
        tmp_path / "p.geojson",
        "--format",
        "json",
    )
    assert r.exit_code == 0, r.output
    recs = json.loads(r.stdout)
    assert [x["id"] for x in recs] == ["text-00000", "Paris", "Springfield"]
    assert [x["query"] for x in recs] == [LONG, "Paris", "Springfield"]
    import csv

    rows = list(csv.DictReader((tmp_path / "p.csv").open(encoding="utf-8")))
    assert [row["query"] for row in rows] == [LONG, "Paris", "Springfield"]
    gj = json.loads((tmp_path / "p.geojson").read_text(encoding="utf-8"))
    assert {f["properties"]["query"] for f in gj["features"]} == {LONG, "Paris", "Springfield"}
    # Text items from a manifest (ids like gn-000004): the table and the JSON show the text too.
    predictor = Predictor.from_pretrained(text_ckpt)
    item = Item(
        id="gn-000004", split="test", lat=48.85, lon=2.35, payload="Paris", source="rg.csv:row 4", kind="text"
    )
    (res,) = predictor.predict([item], top_k=2, samples=16, steps=2)
    assert res.id == "gn-000004" and res.query == "Paris" and res.to_json()["query"] == "Paris"
    from geoloc.export import format_table

    header, line = format_table([res], top_k=2).splitlines()
    assert "query" in header and "gn-000004" in line and "Paris" in line


def test_texts_from_stdin(text_ckpt):
    r = runner.invoke(
        app,
        ["predict", "-c", str(text_ckpt), "--text", "-", *_FAST, "--no-progress", "--format", "jsonl"],
        input="Springfield\n\nParis\n",
    )
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["query"] for line in r.stdout.splitlines()] == ["Springfield", "Paris"]
    r = runner.invoke(
        app,
        ["predict", "-", "-c", str(text_ckpt), *_FAST, "--no-progress", "-f", "json"],
        input="Reykjavik\n",
    )
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(r.stdout)
    assert rec["id"] == "Reykjavik" and rec["kind"] == "text"


def test_json_to_stdout_logs_to_stderr(tmp_path, vmf_ckpt):
    photos = write_images(tmp_path / "photos", n=2)
    r = _run(
        photos,
        "-c",
        vmf_ckpt,
        "--samples",
        "32",
        "--steps",
        "2",
        "--format",
        "json",
        "--estimator",
        "sample",
        "--out",
        tmp_path / "p.parquet",
        "--max-failure-rate",
        "0.5",
    )
    assert r.exit_code == 0, r.output
    recs = json.loads(r.stdout)  # stdout is nothing but the JSON list
    assert len(recs) == 3 and "3 item(s), 2 located, 1 failed" in r.stderr and "wrote" in r.stderr
    keys = {
        "id",
        "query",
        "lat",
        "lon",
        "estimate_kind",
        "estimate_mode",
        "top_k",
        "other_mass",
        "localizability_bits",
        "error",
    }
    assert all(keys <= set(x) for x in recs) and len({tuple(x) for x in recs}) == 1  # same keys everywhere
    ok = [x for x in recs if x["error"] is None]
    assert len(ok) == 2 and all(x["estimate_kind"] == "mean-direction" for x in ok)
    for x in ok:  # the vMF's estimate is its mean direction: in the top mode, which is Paris
        assert (
            x["estimate_mode"] == 1 and x["top_k"][0]["mass"] > 0.9 and x["top_k"][0]["place"].endswith("FR")
        )
        assert haversine_km(np.array(PARIS), np.array([x["lat"], x["lon"]])) < 1.0
    bad = [x for x in recs if x["error"] is not None]
    assert bad[0]["lat"] is None and "decode" in bad[0]["error"]
    r = _run(photos, "-c", vmf_ckpt, "--samples", "8", "--steps", "2", "--format", "table", "--no-progress")
    assert "estimate is" in r.stdout and "in mode #1" in r.stdout and "item(s)" not in r.stdout


def test_options_are_checked_before_any_work(tmp_path):
    from geoloc.errors import ConfigError

    nowhere = tmp_path / "no-checkpoint"  # loading it would fail: the option errors must come first
    r = _run("-c", nowhere, "--text", "Paris", "--out", tmp_path / "x.json")
    assert isinstance(r.exception, ConfigError) and ".csv or .parquet" in str(r.exception)
    r = _run("-c", nowhere, "--text", "Paris", "--density-out", tmp_path / "cells.txt")
    assert isinstance(r.exception, ConfigError) and ".geojson" in str(r.exception)
    r = _run("-c", nowhere, "--text-file", tmp_path / "missing.txt")
    assert isinstance(r.exception, InputError) and "missing.txt" in str(r.exception)
    r = _run("-c", nowhere, "--text", "Paris", "--estimator", "foo")
    assert r.exit_code == 2 and "'foo' is not one of" in r.output and "median" in r.output
    r = _run("-c", nowhere, "--text", "Paris", "--format", "xml")
    assert r.exit_code == 2 and "'xml' is not one of" in r.output
    r = _run("-c", nowhere, "--text", "Paris", "--map-format", "gif")
    assert r.exit_code == 2 and "'gif' is not one of" in r.output
    assert not (tmp_path / "x.json").exists()


def test_no_third_party_progress_noise(text_ckpt):
    quiet = _run("-c", text_ckpt, "--text", "Paris", *_FAST, "--no-progress", "-f", "json")
    assert quiet.exit_code == 0, quiet.output
    assert "Loading weights" not in quiet.stderr and "%|" not in quiet.stderr, quiet.stderr
    loud = _run("-c", text_ckpt, "--text", "Paris", *_FAST, "-f", "json")
    assert loud.exit_code == 0 and "predict" in loud.stderr  # our bar, on stderr
    assert "Loading weights" not in loud.stderr  # third-party loading bars never: only ours
    assert json.loads(loud.stdout)[0]["query"] == "Paris"  # bars never reach stdout
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # the library's setting is restored afterwards


def test_progress_moves_every_few_items(text_ckpt):
    from geoloc.pipeline.items import Failure
    from geoloc.pipeline.predict_job import _MODEL_CHUNK, collect_inputs

    predictor = Predictor.from_pretrained(text_ckpt)
    records = collect_inputs([f"town {i}" for i in range(_MODEL_CHUNK + 3)], text=True)
    records.append(Failure(id="gone", source="gone", reason="no such file"))
    steps: list[int] = []
    out = predictor._run_batch(records, PredictOptions(top_k=1, samples=8, steps=2), steps.append)
    assert steps == [1, _MODEL_CHUNK, 3] and len(out) == len(records)
    assert [o.id for o in out[:2]] == ["town 0", "town 1"] and out[-1].error == "no such file"


def test_density_cells_export(tmp_path):
    ckpt = make_checkpoint(tmp_path / "rfm", family="rfm-s2")
    photos = write_images(tmp_path / "photos", 2)
    args = (
        "--max-maps",
        "2",
        "--map-levels",
        "1",
        "--map-steps",
        "2",
        "--map-start",
        "0",
        "--samples",
        "16",
        "--steps",
        "2",
        "--no-progress",
        "-q",
        "--max-failure-rate",
        "0.5",
    )
    r = _run(photos, "-c", ckpt, "--density-out", tmp_path / "cells.parquet", *args)
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "cells.parquet").to_pylist()
    items = sorted({row["item_id"] for row in t})
    assert items == sorted(str(p) for p in photos.glob("img*.png"))  # broken.jpg failed: no cells
    for item in items:
        rows = [row for row in t if row["item_id"] == item]
        assert len({row["cell"] for row in rows}) == len(rows) > 100  # 122 res-0 cells, some refined
        mass = sum(row["mass"] for row in rows)
        assert all(row["mass"] >= 0 for row in rows) and 0.2 < mass < 5  # a density, whatever its training
    r = _run(photos, "-c", ckpt, "--density-out", tmp_path / "cells.geojson", *args)
    assert r.exit_code == 0, r.output
    gj = json.loads((tmp_path / "cells.geojson").read_text())
    assert len(gj["features"]) == len(t)
    f = gj["features"][0]
    assert f["geometry"]["type"] in ("Polygon", "MultiPolygon") and f["properties"]["item_id"] in items
    assert not (tmp_path / "maps").exists()  # cells only: no pictures were drawn
