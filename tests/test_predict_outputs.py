"""The estimate agrees with the top-k modes or is labelled for what it is, in every output (issue 14 §3).

A two-component vMF mixture (70% at Paris, 30% at New York, ~45 km spread each) makes the answers
checkable: the mixture's mean direction lies in the North Atlantic, outside both modes; the median and the
vMF point estimate lie in the Paris mode. A random RFM flow checks the labelling of the guided draw.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from geoloc.config import FamilyConfig, ModelConfig
from geoloc.export import format_table, prediction_rows, to_geojson
from geoloc.geolocator import Geolocator
from geoloc.predict import EmbeddingPredictor, ItemPrediction, Mode, Place
from geoloc.sphere import haversine_km, latlon_to_xyz

PARIS = (48.8566, 2.3522)
NEW_YORK = (40.7128, -74.0060)


def mixture(weights=(0.7, 0.3), kappa=2e4) -> Geolocator:
    fam = FamilyConfig(name="vmf-mix", components=2, cond_drop=0.0)
    torch.manual_seed(0)
    geo = Geolocator.build(fam, ModelConfig(dim=16, depth=1, expansion=2), 8)
    with torch.no_grad():
        for head in (geo.net.mu_head, geo.net.kappa_head, geo.net.weight_head):
            head[-1].weight.zero_()
        geo.net.mu_head[-1].bias.copy_(latlon_to_xyz(torch.tensor([PARIS, NEW_YORK])).reshape(-1))
        geo.net.kappa_head[-1].bias.fill_(kappa)
        geo.net.weight_head[-1].bias.copy_(torch.log(torch.tensor(weights)))
    return geo


@pytest.fixture(scope="module")
def mix() -> Geolocator:
    return mixture()


def _cond(b: int = 2) -> torch.Tensor:
    return torch.zeros(b, 8)


def test_modes_of_the_mixture_carry_its_weights(mix):
    g = torch.Generator().manual_seed(0)
    pred = mix.predict(_cond(), estimator="median", n=1000, top_k=3, generator=g)
    mass = pred.topk.mass
    assert mass[:, 0].tolist() == pytest.approx([0.7, 0.7], abs=0.04)
    assert mass[:, 1].tolist() == pytest.approx([0.3, 0.3], abs=0.04)
    top = pred.topk.latlon[0, 0].double().numpy()
    assert haversine_km(np.array(PARIS), top) < 20


@pytest.mark.parametrize(
    ("estimator", "kind", "mode"),
    [("sample", "mean-direction", 0), ("median", "median", 0), ("mode", "mode", 0), ("mean", "mean", -1)],
)
def test_the_estimate_is_placed_in_a_mode_or_outside(mix, estimator, kind, mode):
    g = torch.Generator().manual_seed(1)
    pred = mix.predict(_cond(), estimator=estimator, n=512, top_k=3, generator=g)
    assert pred.estimate_kind == kind and pred.estimate_omega == 0.0
    assert pred.estimate_mode.tolist() == [mode, mode]
    est = pred.latlon[0].double().numpy()
    if mode == 0:  # in the Paris basin: within a few spreads of Paris
        assert haversine_km(np.array(PARIS), est) < 100
    else:  # the mean direction of Paris (70%) and New York (30%): ~1,700 km from Paris, over the Atlantic
        assert haversine_km(np.array(PARIS), est) > 1000 and haversine_km(np.array(NEW_YORK), est) > 3000


def test_no_top_k_no_mode(mix):
    pred = mix.predict(_cond(1), estimator="median", n=64, top_k=0)
    assert pred.topk is None and pred.estimate_mode is None


def test_a_guided_draw_is_labelled_as_one():
    fam = FamilyConfig(name="rfm-s2", cond_drop=0.1)
    torch.manual_seed(0)
    geo = Geolocator.build(fam, ModelConfig(dim=16, depth=1, expansion=2), 8)
    geo.sample_config = type(geo.sample_config)(**{**geo.sample_config.__dict__, "steps": 4})
    predictor = EmbeddingPredictor(geo)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 8, generator=g)
    guided = predictor.predict_embeddings(
        cond, top_k=2, samples=64, steps=4, places=False, estimator="sample"
    )
    assert all(r.estimate_kind == "guided-sample" and r.estimate_omega == 2.0 for r in guided)
    assert all(r.estimate_mode in (-1, 1, 2) for r in guided)
    assert all(r.estimate_label.startswith("guided sample (ω=2)") for r in guided)
    plain = predictor.predict_embeddings(
        cond, top_k=2, samples=64, steps=4, places=False, omega=0.0, estimator="sample"
    )
    assert all(r.estimate_kind == "sample" and not r.estimate_label.startswith("guided") for r in plain)
    assert all(r.estimate_label.startswith(("in mode #", "outside the top-")) for r in plain)


def test_embedding_predictor_ranks_are_one_based(mix):
    out = EmbeddingPredictor(mix).predict_embeddings(
        _cond(), top_k=2, samples=512, estimator="mean", places=False, ids=["a", "b"]
    )
    assert [r.estimate_mode for r in out] == [-1, -1]
    assert out[0].estimate_label == "outside the top-2 modes"
    out = EmbeddingPredictor(mix).predict_embeddings(
        _cond(), top_k=2, samples=512, estimator="median", places=False, queries=["Paris?", "Where?"]
    )
    assert [r.estimate_mode for r in out] == [1, 1] and out[0].estimate_label == "in mode #1"
    assert [r.query for r in out] == ["Paris?", "Where?"]
    assert math.isclose(sum(m.mass for m in out[0].modes) + out[0].other_mass, 1.0, abs_tol=1e-6)


# ----------------------------------------------------------------------------------------- outputs
def _item(mode: int | None, kind: str = "median", **kw) -> ItemPrediction:
    paris = Place("Paris", "Île-de-France", "Paris", "FR", *PARIS, 1.0)
    modes = [Mode(*PARIS, 0.62, paris), Mode(*NEW_YORK, 0.3, None)]
    base = dict(
        id="gn-000004",
        input="rg_cities1000.csv:row 4",
        kind="text",
        query="Paris",
        lat=45.0,
        lon=-30.0,
        estimator="median",
        estimate_kind=kind,
        estimate_mode=mode,
        modes=modes,
        other_mass=0.08,
        place=paris,
    )
    return ItemPrediction(**{**base, **kw})


def test_every_output_says_where_the_estimate_is():
    inside, outside = _item(1), _item(-1, id="gn-000005")
    guided = _item(-1, kind="guided-sample", estimate_omega=2.0, id="gn-000006", estimator="sample")
    failed = ItemPrediction(id="t", input="t", kind="text", query="t", error="empty text")
    assert inside.estimate_label == "in mode #1"
    assert outside.estimate_label == "outside the top-2 modes"
    assert guided.estimate_label == "guided sample (ω=2), outside the top-2 modes"
    table = format_table([inside, outside, guided, failed], top_k=2)
    lines = table.splitlines()
    assert "estimate is" in lines[0] and "query" in lines[0]
    assert "in mode #1" in lines[1] and "Paris" in lines[1] and "gn-000004" in lines[1]
    assert "outside the top-2 modes" in lines[2] and "guided sample (ω=2)" in lines[3]
    assert "error: empty text" in lines[4]
    rows = prediction_rows([inside, outside, guided, failed], top_k=2)
    assert [r["estimate_mode"] for r in rows] == [1, -1, -1, None]
    assert [r["query"] for r in rows] == ["Paris", "Paris", "Paris", "t"]
    assert rows[2]["estimate_kind"] == "guided-sample" and rows[2]["estimate_label"].startswith("guided")
    feats = to_geojson([inside, guided])["features"]
    est = [f["properties"] for f in feats if f["properties"]["role"] == "estimate"]
    assert [p["estimate_mode"] for p in est] == [1, -1] and all(p["query"] == "Paris" for p in est)
    assert est[1]["estimate_label"] == "guided sample (ω=2), outside the top-2 modes"


def test_json_record_has_stable_keys():
    rec = _item(1).to_json()
    json.dumps(rec)  # plain JSON types only
    for key in (
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
    ):
        assert key in rec
    assert rec["query"] == "Paris" and rec["id"] == "gn-000004" and rec["estimate_mode"] == 1
    assert rec["top_k"][0] == {
        "rank": 1,
        "lat": PARIS[0],
        "lon": PARIS[1],
        "mass": 0.62,
        "place": "Paris, Île-de-France, FR",
    }
    assert rec["top_k"][1]["place"] is None and "regions" not in rec
    bad = ItemPrediction(id="x", input="x", kind="image", error="no such file").to_json()
    assert (
        set(bad) == set(rec) and bad["lat"] is None and bad["top_k"] == [] and bad["error"] == "no such file"
    )
    nan = _item(1, localizability_bits=float("nan")).to_json()
    assert nan["localizability_bits"] is None


def test_csv_has_query_and_mode_columns(tmp_path):
    from geoloc.export import write_table

    path = write_table([_item(1), _item(-1)], tmp_path / "p.csv", top_k=2)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert (
        rows[0]["query"] == "Paris" and rows[0]["estimate_mode"] == "1" and rows[1]["estimate_mode"] == "-1"
    )
    assert rows[1]["estimate_label"] == "outside the top-2 modes"
