"""Neighbour indexes over stores (exact and quantised), their files, and a hybrid fitted end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig
from geoloc.errors import CheckpointError, ConfigError
from geoloc.geolocator import Geolocator
from geoloc.hybrid import ExactNeighbours
from geoloc.pipeline.fit_hybrid import HYBRID_FILE, FitHybridConfig, fit_hybrid, load_hybrid, read_items
from geoloc.pipeline.neighbours import NeighbourIndex
from tests.helpers import make_store

DIM = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb") / "store"
    make_store(root, 1200, DIM, splits={"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    return root


def test_flat_index_matches_brute_force_and_round_trips(store, tmp_path):
    idx = NeighbourIndex.build([store], "train", kind="flat")
    items = read_items([store], "train")
    assert len(idx) == len(items.ids) and idx.meta["factory"] == "Flat"
    exact = ExactNeighbours(items.cond, items.xyz)
    q = read_items([store], "test").cond
    a, b = idx.search(q, 8), exact.search(q, 8)
    assert torch.equal(a.index, b.index)
    assert torch.allclose(a.sim, b.sim, atol=1e-5) and torch.allclose(a.xyz, b.xyz, atol=1e-6)
    idx.save(tmp_path)
    again = NeighbourIndex.load(tmp_path)
    assert torch.equal(again.search(q, 8).index, a.index)
    assert list(again.ids) == items.ids
    meta = json.loads((tmp_path / "neighbours.json").read_text())
    assert meta["stores"][0]["rows"] == len(items.ids) and len(meta["stores"][0]["shards_sha256"]) == 64


def test_a_limited_read_is_a_uniform_hash_sample_not_the_first_rows(store, monkeypatch):
    """``max_items`` takes the rows whose ids hash lowest, in hash order: reproducible, spread over the whole
    split (a store written from a table sorted by country would otherwise give a slice of a few countries),
    with the right embeddings and coordinates for each id; the sample does not depend on the read's
    internal compaction."""
    from geoloc.subsample import id_hashes

    every = read_items([store], "train")
    some = read_items([store], "train", max_items=50)
    h = id_hashes(every.ids)
    want = [every.ids[i] for i in np.argsort(h, kind="stable")[:50]]
    assert some.ids == want and some.ids != every.ids[:50]
    pos = {i: k for k, i in enumerate(every.ids)}
    rows = torch.tensor([pos[i] for i in some.ids])
    assert torch.equal(some.cond, every.cond[rows])
    assert np.array_equal(some.latlon, every.latlon[rows.numpy()])
    # Rows spread over the store: the sample's median position is near the middle, not in the first 50.
    assert 0.3 * len(every.ids) < float(np.median(rows.numpy())) < 0.7 * len(every.ids)
    monkeypatch.setattr("geoloc.pipeline.fit_hybrid.READ_ROWS", 64)  # compact many times while reading
    assert read_items([store], "train", max_items=5).ids == want[:5]


def test_exclusion_drops_the_items_own_row(store):
    idx = NeighbourIndex.build([store], "train", kind="flat")
    items = read_items([store], "train", max_items=50)
    rows = torch.from_numpy(idx.rows_of(items.ids))
    assert torch.equal(idx.search(items.cond, 3).index[:, 0], rows)  # each item finds itself first
    nb = idx.search(items.cond, 3, exclude=rows)
    assert not bool((nb.index == rows[:, None]).any()) and bool((nb.index >= 0).all())
    assert idx.rows_of(["nope"]).tolist() == [-1]


def test_quantised_index_finds_most_true_neighbours():
    g = np.random.default_rng(0)
    centres = g.normal(size=(200, 32))
    x = (centres[g.integers(0, 200, 8000)] + 0.3 * g.normal(size=(8000, 32))).astype(np.float32)
    xyz = np.tile(np.array([[0, 0, 1.0]], dtype=np.float32), (len(x), 1))
    q = torch.from_numpy(x[:300] + 0.05 * g.normal(size=(300, 32)).astype(np.float32))
    truth = ExactNeighbours(torch.from_numpy(x), torch.from_numpy(xyz)).search(q, 10).index
    # SQ8 keeps nearly every neighbour; PQ at D/16 bytes per vector trades recall for 16× less memory.
    for kind, want in (("ivf-sq8", 0.9), ("ivf-pq", 0.2)):
        idx = NeighbourIndex.from_arrays(x, xyz, kind=kind)
        got = idx.search(q, 10).index
        recall = np.mean(
            [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got, truth, strict=True)]
        )
        assert recall >= want, (kind, recall)
    with pytest.raises(ConfigError):
        NeighbourIndex.from_arrays(x, xyz, kind="hnsw-magic")


def test_fit_and_load_a_hybrid_checkpoint(store, tmp_path):
    flow = Geolocator.build(
        FamilyConfig(name="vmf"),
        ModelConfig(dim=16, depth=1, expansion=2),
        cond_dim=DIM,
        config={"family": {"name": "vmf"}, "model": {"dim": 16, "depth": 1, "expansion": 2}, "cond_dim": DIM},
    )
    ckpt = tmp_path / "flow"
    flow.save_pretrained(ckpt)
    cfg = FitHybridConfig(val_split="val", max_val=100, ks=(4, 16), likelihood=LikelihoodConfig(steps=4))
    doc = fit_hybrid(ckpt, [store], config=cfg)
    assert (ckpt / HYBRID_FILE).exists() and doc["flow"] == "."
    assert doc["fitted_on"] == {"split": "val", "where": None, "items": 100, "flow_trained_where": ""}
    # The embeddings know where items are, so the neighbours beat an untrained network by a wide margin.
    assert doc["fit"]["nll"] < doc["fit"]["flow_nll"] - 1.0
    h = load_hybrid(ckpt)
    assert h.params.k in (4, 16) and math.isclose(h.params.kappa, doc["params"]["kappa"])
    test = read_items([store], "test", max_items=20)
    pred = h.predict(test.cond, n=8, steps=4, generator=torch.Generator().manual_seed(0))
    assert pred.latlon.shape == (20, 2) and bool(torch.isfinite(pred.latlon).all())
    lp = h.log_prob(test.xyz, test.cond)
    assert lp.shape == (20,) and bool(torch.isfinite(lp).all())
    with pytest.raises(CheckpointError):
        load_hybrid(tmp_path)
