"""`geoloc predict` and the Python API on a hybrid checkpoint built in the test: loading and its checks,
exact densities through the prediction path, region areas against closed forms, best answers by default.

The database is a small synthetic store (``tests.helpers.make_store``) of ``tiny-random``-sized features; the
flows are an untrained rfm-s2 network (its density is exact whatever the weights) and a vMF network. The
hybrid is fitted with ``fit_hybrid`` once; other parameter sets are hand-written ``hybrid.json`` files over
the same index, so the numbers (mass, areas) have closed forms or quadratures to compare with.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import shutil

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from geoloc.checkpoint import save_checkpoint
from geoloc.cli import app
from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig, PredictOptions, config_to_dict
from geoloc.density import density_maps, highest_density_regions
from geoloc.errors import CheckpointError
from geoloc.geolocator import Geolocator
from geoloc.hybrid import HybridGeolocator
from geoloc.hybrid_bound import BoundHybrid, bind_batch
from geoloc.pipeline.fit_hybrid import HYBRID_FILE, FitHybridConfig, fit_hybrid, read_items
from geoloc.pipeline.predict_job import Predictor, load_predictor
from geoloc.sphere import EARTH_RADIUS_KM, equal_area_grid

DIM = 64  # the tiny-random image backbone's width, so the CLI can run images through the hybrid
BACKBONE = "tiny-random"


def _flow_checkpoint(path, family: str) -> str:
    fam = FamilyConfig(name=family, cond_drop=0.0)
    model = ModelConfig(dim=16, depth=1, expansion=2)
    torch.manual_seed(0)
    geo = Geolocator.build(fam, model, DIM)
    with torch.no_grad():  # zero-initialised output layers would make the flow's field trivial
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
            "cond_dim": DIM,
            "backbone": {"name": BACKBONE, "revision": "", "dim": DIM, "preprocessing": {}},
        },
    )
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tests.helpers import make_store

    root = tmp_path_factory.mktemp("hybrid-predict")
    store = root / "store"
    make_store(
        store, 600, DIM, splits={"train": 0.8, "val": 0.1, "test": 0.1}, seed=5, backbone_name=BACKBONE
    )
    rfm = _flow_checkpoint(root / "rfm", "rfm-s2")
    vmf = _flow_checkpoint(root / "vmf", "vmf")
    cfg = FitHybridConfig(val_split="val", max_val=60, ks=(4, 8), likelihood=LikelihoodConfig(steps=4))
    doc = fit_hybrid(rfm, [store], root / "hybrid", cfg)
    test = read_items([store], "test", max_items=6)
    return {
        "root": root,
        "store": store,
        "rfm": rfm,
        "vmf": vmf,
        "hybrid": root / "hybrid",
        "doc": doc,
        "test": test,
    }


def _variant(built, name: str, flow: str, **params) -> str:
    """A copy of the fitted hybrid with hand-set parameters over the same index (and another flow)."""
    out = built["root"] / name
    if not out.exists():
        shutil.copytree(built["hybrid"], out)
    doc = json.loads((built["hybrid"] / HYBRID_FILE).read_text())
    doc["flow"] = flow
    doc["params"] = {
        **doc["params"],
        "kappa_slope": 0.0,
        "lam_b": 0.0,
        "answer_k": 0,
        "answer_tau": 0.0,
        **params,
    }
    doc["calibration"] = None  # a level map belongs to the parameters it was fitted with
    (out / HYBRID_FILE).write_text(json.dumps(doc))
    return str(out)


def test_predictor_loads_the_hybrid_and_answers_with_max_expected_geoscore(built):
    p = Predictor.from_pretrained(built["hybrid"], load_backbone=False)
    h = p.geolocator
    assert isinstance(h, HybridGeolocator) and h.params.k in (4, 8)
    # Best answers by default, in the options, the flow's API and the hybrid's.
    assert PredictOptions().estimator == "geoscore"
    assert inspect.signature(Geolocator.predict).parameters["estimator"].default == "geoscore"
    cli = {q.name: q for q in typer.main.get_command(app).commands["predict"].params}
    for opt in ("estimator", "regions", "region_samples"):
        assert cli[opt].default == getattr(PredictOptions(), opt), opt
    test = built["test"]
    calls = []
    search = h.index.search
    h.index.search = lambda *a, **k: calls.append(1) or search(*a, **k)
    try:
        res = p.predict_embeddings(
            test.cond,
            places=False,
            top_k=2,
            samples=16,
            steps=4,
            localizability=True,
            region_samples=64,
            localizability_samples=32,
            batch_size=4,
        )
    finally:
        h.index.search = search
    # One neighbour search per batch (6 items in batches of 4), shared by the estimate, top-k, the exact
    # draws behind localizability and the region areas.
    assert len(calls) == 2
    assert [r.estimator for r in res] == ["geoscore"] * 6
    # The estimate is the hybrid's own geoscore answer for these draws.
    direct = h.predict(test.cond[:4], n=16, steps=4, generator=torch.Generator().manual_seed(0))
    got = np.array([[r.lat, r.lon] for r in res[:4]])
    assert np.allclose(got, direct.latlon.double().numpy(), atol=1e-4)
    for r in res:
        a50, a90 = r.region_km2[0.5], r.region_km2[0.9]
        assert 0 < a50 < a90 <= 4 * math.pi * EARTH_RADIUS_KM**2
        assert r.localizability_bits is not None and len(r.modes) >= 1
    assert (
        p.predict_embeddings(test.cond[:1], places=False, regions=False, samples=8, steps=4)[0].region_km2
        == {}
    )


def test_hybrid_density_through_the_prediction_path_integrates_to_one(built):
    h = load_predictor(
        _variant(built, "mix", built["rfm"], k=4, tau=0.2, kappa=40.0, lam_a=0.0), load_backbone=False
    ).geolocator
    cond = built["test"].cond[:2]
    bound = bind_batch(h, cond)
    assert isinstance(bound, BoundHybrid) and bind_batch(h.flow, cond) is h.flow
    grid, cell = equal_area_grid(64, 128, dtype=torch.float32)
    for i in range(2):
        # The map path: one condition row per point, each a copy of one of the batch's items.
        lp = bound.log_prob(grid, cond[i].expand(len(grid), -1))
        mass = float(lp.exp().sum()) * cell
        assert abs(mass - 1.0) < 0.01, (i, mass)
        assert torch.allclose(lp[:500], h.log_prob(grid[:500], cond[i]), atol=1e-4)
    lam = h.flow_weight(cond)
    assert bool(((lam > 0.3) & (lam < 0.7)).all())  # both components carry mass


def _vmf_cap_km2(kappa: float, alpha: float) -> float:
    """Area of the α-HDR of a vMF on S²: the cap holding α of the mass."""
    one_minus_cos = -math.log1p(-alpha * -math.expm1(-2 * kappa)) / kappa
    return 2 * math.pi * one_minus_cos * EARTH_RADIUS_KM**2


@pytest.mark.parametrize("kappa", [40.0, 2000.0])
def test_region_areas_of_a_vmf_like_hybrid_match_the_closed_form(built, kappa):
    # λ ≈ 0 and one neighbour: the hybrid is one vMF around the nearest training item.
    d = _variant(built, f"vmf-like-{kappa:g}", built["vmf"], k=1, kappa=kappa, lam_a=-40.0)
    p = load_predictor(d, load_backbone=False)
    res = p.predict_embeddings(
        built["test"].cond[:3],
        places=False,
        top_k=0,
        samples=8,
        region_samples=4000,
        region_levels=(0.5, 0.9),
    )
    for r in res:
        for alpha in (0.5, 0.9):
            want = _vmf_cap_km2(kappa, alpha)
            assert r.region_km2[alpha] == pytest.approx(want, rel=0.04), (alpha, r.region_km2[alpha], want)


def test_map_regions_of_the_hybrid_agree_with_predicts_areas(built):
    # The maps outline highest-density regions from an adaptive density map (quadrature); predict
    # estimates their areas from exact draws (importance sampling). Same density, two estimators.
    d = _variant(built, "map", built["vmf"], k=1, kappa=40.0, lam_a=-40.0)
    p = load_predictor(d, load_backbone=False)
    cond = built["test"].cond[:2]
    res = p.predict_embeddings(cond, places=False, top_k=0, samples=8, region_samples=4000)
    maps = density_maps(bind_batch(p.geolocator, cond), cond)
    for r, dmap in zip(res, maps, strict=True):
        assert abs(dmap.total_mass - 1.0) < 0.02
        for reg in highest_density_regions(dmap, (0.5, 0.9)):
            assert reg.area_km2 == pytest.approx(r.region_km2[reg.level], rel=0.06), reg.level


def test_missing_or_mismatched_index_and_store_give_one_line_errors(built):
    broken = built["root"] / "no-index"
    shutil.copytree(built["hybrid"], broken)
    (broken / "neighbours.faiss").unlink()
    with pytest.raises(CheckpointError) as e:
        load_predictor(broken, load_backbone=False)
    msg = str(e.value)
    assert "\n" not in msg and "neighbours.faiss" in msg and "fit_hybrid" in msg
    r = CliRunner().invoke(app, ["predict", "--text", "x", "-c", str(broken)])
    assert r.exit_code != 0 and isinstance(r.exception, CheckpointError)

    def edited(name: str, edit) -> str:
        out = built["root"] / name
        shutil.copytree(built["hybrid"], out)
        doc = json.loads((out / HYBRID_FILE).read_text())
        edit(doc)
        (out / HYBRID_FILE).write_text(json.dumps(doc))
        return str(out)

    moved = edited("moved-store", lambda doc: doc["database"][0].update(path=str(built["root"] / "gone")))
    with pytest.raises(CheckpointError, match="store this hybrid retrieves from") as e:
        load_predictor(moved, load_backbone=False)
    assert "\n" not in str(e.value) and "gone" in str(e.value)
    # The index alone is enough to answer when the user says so.
    assert isinstance(
        load_predictor(moved, load_backbone=False, verify_store=False).geolocator, HybridGeolocator
    )
    grown = edited("grown-store", lambda doc: doc["database"][0].update(shards_sha256="0" * 64))
    with pytest.raises(CheckpointError, match="changed since the hybrid was fitted"):
        load_predictor(grown, load_backbone=False)
    other = edited("other-index", lambda doc: doc["index"].update(rows=123))
    with pytest.raises(CheckpointError, match="holds 480 rows"):
        load_predictor(other, load_backbone=False)


def test_cli_predicts_images_with_the_hybrid_and_writes_region_areas(built, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photos / f"img{i}.png")
    r = CliRunner().invoke(
        app,
        [
            "predict",
            str(photos),
            "-c",
            str(built["hybrid"]),
            "--samples",
            "8",
            "--steps",
            "4",
            "--no-progress",
            "--out",
            str(tmp_path / "p.csv"),
            "--geojson",
            str(tmp_path / "p.geojson"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "50% km²" in r.output and "90% km²" in r.output
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 2 and {"region50_km2", "region90_km2"} <= set(rows[0])
    for row in rows:
        assert row["estimator"] == "geoscore" and 0 < float(row["region50_km2"]) < float(row["region90_km2"])
    props = [
        f["properties"]
        for f in json.loads((tmp_path / "p.geojson").read_text())["features"]
        if f["properties"]["role"] == "estimate"
    ]
    assert len(props) == 2 and all(p["region50_km2"] < p["region90_km2"] for p in props)
