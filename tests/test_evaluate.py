"""`geoloc.evaluate` through the eval job: closed-form baselines, retrieval, failures, seeds, label handling,
outputs, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from geoloc.config import EvalConfig, FamilyConfig, LikelihoodConfig, ModelConfig
from geoloc.errors import BackboneError, ConfigError, StoreError
from geoloc.evaluate import score_rows
from geoloc.geolocator import Geolocator
from geoloc.metrics import MISS_KM
from geoloc.pipeline.eval_batches import iter_eval_batches
from geoloc.pipeline.eval_job import evaluate_stores, retrieval_from_stores, run_eval
from geoloc.pipeline.store import BackboneInfo, FeatureStore, build_table
from geoloc.predictors import RetrievalPredictor, uniform_geolocator
from geoloc.report import EvalData, RowPredictions
from geoloc.sphere import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon
from tests.helpers import make_latlon, make_store, synthetic_embeddings
from tests.synthetic import VmfMixtureTask

ROOT = Path(__file__).resolve().parents[1]
R = EARTH_RADIUS_KM
UNIFORM_NLL = math.log2(4 * math.pi) / 3
FAST = EvalConfig(seeds=(0,), steps=8, prdc=False)


def tiny_checkpoint(path: Path, cond_dim: int, backbone: dict | None = None) -> Path:
    """An untrained rfm-s2 checkpoint (a real config.json + weights) for the checks that need one."""
    cfg = {
        "family": {"name": "rfm-s2"},
        "model": {"dim": 32, "depth": 1, "expansion": 2},
        "cond_dim": cond_dim,
    }
    if backbone is not None:
        cfg["backbone"] = backbone
    geo = Geolocator.build(
        FamilyConfig(name="rfm-s2"), ModelConfig(dim=32, depth=1, expansion=2), cond_dim, config=cfg
    )
    geo.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory) -> Path:
    """4000 test items (clustered ground truth), 1000 train items, no label columns."""
    root = tmp_path_factory.mktemp("wide") / "store"
    make_store(root, 5000, 16, splits={"test": 0.8, "train": 0.2}, label_columns=(), seed=3)
    return root


def _copies_store(root: Path, n: int = 300, dim: int = 16, labels: dict | None = None) -> Path:
    """A store whose test split is an exact copy (embeddings and coordinates) of its train split."""
    rng = np.random.default_rng(5)
    latlon = make_latlon(n, rng)
    emb = synthetic_embeddings(latlon, dim, seed=5)
    cols = tuple(labels or ())
    store = FeatureStore.create(root, BackboneInfo("test", "r", dim, {}), label_columns=cols)
    for split, prefix in (("train", "a"), ("test", "b")):
        ids = [f"{prefix}{i:05d}" for i in range(n)]
        store.write_shard(build_table(ids, split, latlon[:, 0], latlon[:, 1], emb, labels, cols), "t")
    return root


@pytest.fixture(scope="module")
def copies_store(tmp_path_factory) -> Path:
    return _copies_store(tmp_path_factory.mktemp("copies") / "store")


@pytest.fixture(scope="module")
def gazetteer():
    from geoloc.gazetteer import Gazetteer

    return Gazetteer.load(table=False)


# ------------------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------------------


def test_uniform_baseline_matches_closed_forms_and_reports_seed_spread(wide_store):
    cfg = EvalConfig(seeds=(0, 1, 2), prdc=False)
    report = evaluate_stores({"uniform": uniform_geolocator(16)}, wide_store, "test", cfg)
    row = report.row("uniform")
    n = report.n
    assert n == 4000 and row.seeds == [0, 1, 2]
    assert row.metrics["n"] == [4000.0] * 3 and row.metrics["n_failed"] == [0.0] * 3
    # Pooled over the three seeds: 12,000 independent uniform predictions.
    d = np.concatenate([s.per_item["dist_km"] for s in row.scores])
    g = np.concatenate([s.per_item["geoscore"] for s in row.scores])
    se = 1 / math.sqrt(len(d))
    mean_d = math.pi * R / 2  # E[d] for independent uniform points: πR/2 = 10,007.5 km
    assert abs(row.stat("dist_km")[0] - mean_d) < 4 * d.std() * se
    a = R / 1492.7
    mean_g = 2500 * (1 + math.exp(-a * math.pi)) / (1 + a * a)  # ∫ 5000 e^{-aθ} sinθ/2 dθ = 130.1
    assert abs(row.stat("geoscore")[0] - mean_g) < 4 * g.std() * se
    p2500 = (1 - math.cos(2500 / R)) / 2  # spherical cap: 3.80 %
    assert abs(row.stat("acc_2500km")[0] - p2500) < 4 * math.sqrt(p2500 * (1 - p2500)) * se
    # NLL of the uniform density is exact: log2(4π)/3 bits per dimension.
    assert row.nll is not None and row.nll.n == n
    assert row.nll.bits_per_dim == pytest.approx(UNIFORM_NLL, abs=1e-6)
    # Seeds are independent prediction sets: the spread is reported, the mean is the mean of the seeds.
    values = row.metrics["dist_km"]
    assert len(set(values)) == 3
    mean, std = row.stat("dist_km")
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1)) and std > 0
    summary = row.to_json()["metrics"]["geoscore"]
    assert summary["values"] == row.metrics["geoscore"] and summary["std"] > 0


def test_retrieval_on_copies_of_train_is_exact_and_deterministic(copies_store):
    retr = retrieval_from_stores([copies_store], "train")
    report = evaluate_stores(
        {"retrieval": retr}, copies_store, "test", dataclasses.replace(FAST, seeds=(0, 1), prdc=True)
    )
    row = report.row("retrieval")
    assert report.n == 300 and row.seeds == [0]  # deterministic: one prediction set, not one per seed
    assert row.stat("dist_km") == (0.0, 0.0)
    assert row.stat("geoscore")[0] == pytest.approx(5000.0)
    assert row.stat("acc_1km")[0] == 1.0
    assert row.nll is None
    # Identical sets: every fake sits on its real, so precision = recall = coverage = 1.
    assert row.stat("precision_unchunked")[0] == 1.0 and row.stat("coverage_unchunked")[0] == 1.0
    full = report.table_markdown("full")
    assert "| Model | GeoScore | dist (km) | median (km) | 1 km | 25 km | 200 km | 750 km | 2500 km |" in full
    assert "| retrieval | 5,000 | 0 | 0 | 100.0 | 100.0 |" in full


def test_retrieval_hnsw_index_finds_the_copies(copies_store):
    retr = retrieval_from_stores([copies_store], "train", index="hnsw")
    report = evaluate_stores({"retrieval": retr}, copies_store, "test", FAST)
    assert report.row("retrieval").stat("acc_1km")[0] == 1.0


# ------------------------------------------------------------------------------------------------------------
# Failures, compat, drop_tail
# ------------------------------------------------------------------------------------------------------------


class _FailEvery:
    """Retrieval that fails (NaN) on every k-th item of each batch: the other items are exact."""

    def __init__(self, inner: RetrievalPredictor, k: int) -> None:
        self.inner, self.k = inner, k
        self.deterministic, self.nll_space, self.expects = True, None, inner.expects

    def info(self):
        return {"kind": "test"}

    def generator(self, seed):
        return torch.Generator().manual_seed(seed)

    def predict(self, cond, generator):
        out = self.inner.predict(cond, generator)
        out[:: self.k] = np.nan
        return out

    def log_prob(self, xyz, cond):
        return None

    def localizability(self, cond, generator):
        return None


def test_nan_predictions_are_counted_misses_or_dropped_in_plonk_mode(copies_store):
    retr = retrieval_from_stores([copies_store], "train")
    cfg = dataclasses.replace(FAST, batch_size=64)
    fixed = evaluate_stores({"bad": _FailEvery(retr, 8)}, copies_store, "test", cfg).row("bad")
    n_bad = sum(len(range(0, len(range(a, min(a + 64, 300))), 8)) for a in range(0, 300, 64))
    assert fixed.metrics["n_failed"] == [n_bad] and fixed.metrics["n"] == [300]
    assert fixed.stat("dist_km")[0] == pytest.approx(n_bad * MISS_KM / 300)
    assert fixed.stat("acc_2500km")[0] == pytest.approx((300 - n_bad) / 300)
    assert fixed.stat("geoscore")[0] == pytest.approx(5000 * (300 - n_bad) / 300)
    plonk = evaluate_stores(
        {"bad": _FailEvery(retr, 8)}, copies_store, "test", dataclasses.replace(cfg, compat="plonk")
    ).row("bad")
    assert plonk.metrics["n"] == [300 - n_bad] and plonk.metrics["n_failed"] == [n_bad]
    assert plonk.stat("dist_km")[0] == 0.0 and plonk.stat("acc_1km")[0] == 1.0


def test_drop_tail_scores_whole_batches_only_and_says_so(copies_store):
    report = evaluate_stores(
        {"u": uniform_geolocator(16)}, copies_store, "test", dataclasses.replace(FAST, drop_tail=128)
    )
    assert report.n_read == 300 and report.n == 256 and report.row("u").metrics["n"] == [256]
    assert any("drop_tail=128" in note for note in report.notes)


# ------------------------------------------------------------------------------------------------------------
# Admin labels
# ------------------------------------------------------------------------------------------------------------


def test_admin_accuracy_from_label_columns_and_from_latlon(tmp_path, gazetteer):
    rng = np.random.default_rng(9)
    latlon = np.concatenate([make_latlon(119, rng), [[-22.56, 17.08]]])  # the last one: Windhoek, Namibia
    ids = gazetteer.label_ids(latlon, ("country", "region", "sub-region", "city"))
    labels = {
        f"unique_{lv}": gazetteer.key_strings(ids[lv], lv).tolist() for lv in ("country", "region", "city")
    }
    assert labels["unique_country"][-1] == "NA"
    root = tmp_path / "s"
    emb = synthetic_embeddings(latlon, 8, seed=1)
    store = FeatureStore.create(root, BackboneInfo("test", "r", 8, {}), label_columns=tuple(labels))
    for split, prefix in (("train", "a"), ("test", "b")):
        store.write_shard(
            build_table(
                [f"{prefix}{i}" for i in range(120)],
                split,
                latlon[:, 0],
                latlon[:, 1],
                emb,
                labels,
                tuple(labels),
            ),
            "t",
        )
    rows = {"retrieval": retrieval_from_stores([root], "train")}
    report = evaluate_stores(rows, root, "test", FAST, gazetteer=gazetteer)
    assert report.levels == {"country": "unique_country", "region": "unique_region", "city": "unique_city"}
    row = report.row("retrieval")
    assert row.stat("acc_country")[0] == 1.0 and row.stat("acc_city")[0] == 1.0
    # compat plonk: pandas reads Namibia's "NA" as NaN, so that item can never be country-correct (quirk C).
    plonk = evaluate_stores(
        rows, root, "test", dataclasses.replace(FAST, compat="plonk"), gazetteer=gazetteer
    )
    assert plonk.row("retrieval").stat("acc_country")[0] == pytest.approx(119 / 120)
    assert plonk.row("retrieval").stat("acc_region")[0] == 1.0
    # Ground truth from the true coordinates (the same nearest-place rule) gives all four levels.
    by_point = evaluate_stores(
        rows, root, "test", dataclasses.replace(FAST, labels="latlon"), gazetteer=gazetteer
    )
    assert set(by_point.levels) == {"country", "region", "sub-region", "city"}
    assert by_point.row("retrieval").stat("acc_sub-region")[0] == 1.0
    # A mapping picks other columns; the table is in the OSV-5M layout.
    mapped = evaluate_stores(
        rows,
        root,
        "test",
        dataclasses.replace(FAST, labels={"country": "unique_country"}),
        gazetteer=gazetteer,
    )
    assert list(mapped.levels) == ["country"]
    table = report.table_markdown()
    assert "| Model | GeoScore | dist (km) | country | region | city |" in table


def test_unknown_label_level_or_column_is_a_clear_error(copies_store):
    with pytest.raises(ConfigError, match=r"unknown label column 'unique_country'.*no label columns"):
        evaluate_stores(
            {"u": uniform_geolocator(16)},
            copies_store,
            "test",
            dataclasses.replace(FAST, labels={"country": "unique_country"}),
        )
    with pytest.raises(ConfigError, match="unknown label level 'continent'"):
        evaluate_stores(
            {"u": uniform_geolocator(16)},
            copies_store,
            "test",
            dataclasses.replace(FAST, labels={"continent": "x"}),
        )


# ------------------------------------------------------------------------------------------------------------
# Errors at the boundary
# ------------------------------------------------------------------------------------------------------------


def test_backbone_mismatch_names_both_backbones(tmp_path, copies_store):
    other = tiny_checkpoint(tmp_path / "dino", 16, {"name": "dinov2-l-reg", "dim": 16})
    with pytest.raises(BackboneError, match=r"'dinov2-l-reg' 16-d.*holds 'test' 16-d"):
        run_eval([copies_store], "test", checkpoints=[other], config=FAST)
    wide = tiny_checkpoint(tmp_path / "wide", 32)
    with pytest.raises(BackboneError, match=r"expects 32-d embeddings but store .* holds 'test' 16-d"):
        run_eval([copies_store], "test", checkpoints=[wide], config=FAST)
    # The same check guards a Geolocator passed to evaluate_stores() directly.
    with pytest.raises(BackboneError):
        evaluate_stores({"u": uniform_geolocator(8)}, copies_store, "test", FAST)


def test_empty_split_lists_the_available_ones(copies_store):
    with pytest.raises(
        StoreError, match=r"no rows in split 'tset'.*available splits: test \(300\), train \(300\)"
    ):
        evaluate_stores({"u": uniform_geolocator(16)}, copies_store, "tset", FAST)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown estimator"):
        EvalConfig(estimator="modal")
    with pytest.raises(ConfigError, match="seeds repeat"):
        EvalConfig(seeds=(1, 1))
    with pytest.raises(ConfigError, match="labels must be"):
        EvalConfig(labels="columns")


def test_retrieval_over_the_evaluated_split_and_unknown_baselines_are_refused(copies_store):
    with pytest.raises(ConfigError, match="would find every item itself"):
        run_eval([copies_store], "train", baselines=["retrieval"], config=FAST)
    with pytest.raises(ConfigError, match="a vmf / vmf-mix model is a checkpoint"):
        run_eval([copies_store], "test", baselines=["vmf"], config=FAST)


# ------------------------------------------------------------------------------------------------------------
# A trained model, end to end, with every output
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small rfm-s2 trained for a few hundred steps on the vMF-mixture task, and a store of that task."""
    from geoloc.batches import InMemoryBatches
    from geoloc.presets import get_preset
    from geoloc.train import train

    base = tmp_path_factory.mktemp("trained")
    task = VmfMixtureTask.default(dim=8)
    g = torch.Generator().manual_seed(0)
    cond, xyz, _ = task.sample(4096, g)
    cfg = get_preset("small-rfm-s2")
    cfg = dataclasses.replace(
        cfg,
        steps=250,
        model=ModelConfig(dim=64, depth=2, expansion=2),
        device="cpu",
        dtype="fp32",
        optim=dataclasses.replace(cfg.optim, warmup_steps=20, lr=3e-3),
        eval_every=10_000,
        ckpt_every=10_000,
        log_every=10_000,
    )
    train(
        cfg,
        InMemoryBatches(cond, xyz, 256, seed=0),
        base / "ckpt",
        8,
        meta={"backbone": {"name": "synthetic", "dim": 8}},
        resume=False,
        progress=False,
    )
    test_cond, test_xyz, _ = task.sample(240, g)
    latlon = xyz_to_latlon(test_xyz.double()).numpy()
    store = FeatureStore.create(base / "store", BackboneInfo("synthetic", "r", 8, {}))
    tr_latlon = xyz_to_latlon(xyz[:600].double()).numpy()
    store.write_shard(
        build_table(
            [f"tr{i}" for i in range(600)],
            "train",
            tr_latlon[:, 0],
            tr_latlon[:, 1],
            cond[:600].numpy(),
            None,
            (),
        ),
        "t",
    )
    store.write_shard(
        build_table(
            [f"te{i}" for i in range(240)], "test", latlon[:, 0], latlon[:, 1], test_cond.numpy(), None, ()
        ),
        "t",
    )
    return base / "ckpt", base / "store"


def test_trained_model_beats_uniform_and_every_output_is_written(trained, tmp_path):
    ckpt, store = trained
    cfg = EvalConfig(
        seeds=(0, 1),
        steps=16,
        likelihood=LikelihoodConfig(method="rk4", steps=4),
        localizability=True,
        localizability_n=4,
        prdc_chunks=4,
    )
    out = tmp_path / "eval"
    report = run_eval(
        [store],
        "test",
        checkpoints=[ckpt],
        baselines=["uniform", "retrieval"],
        config=cfg,
        out_dir=out,
        csv=True,
    )
    assert [r.name for r in report.rows] == ["ckpt", "uniform", "retrieval"]
    model, uniform = report.row("ckpt"), report.row("uniform")
    assert model.seeds == [0, 1] and model.info["family"] == "rfm-s2" and model.info["omega"] == 2.0
    # The task is bimodal per class (a perfect one-sample predictor is still ~5,600 km off on average).
    assert model.stat("dist_km")[0] < 0.75 * uniform.stat("dist_km")[0]
    assert model.stat("geoscore")[0] > 4 * uniform.stat("geoscore")[0]
    assert model.nll.bits_per_dim < UNIFORM_NLL - 0.3
    # The reported NLL is exactly the model's log-density of the true points, in bits per dimension.
    geo = Geolocator.from_pretrained(ckpt)
    xyz = latlon_to_xyz(torch.from_numpy(report.data.latlon)).float()
    cond = torch.cat([b.cond for b in iter_eval_batches([store], "test", 1000)])
    lp = geo.log_prob(xyz, cond, LikelihoodConfig(method="rk4", steps=4))
    assert model.nll.bits_per_dim == pytest.approx(float(-lp.double().mean() / (3 * math.log(2))), rel=1e-5)
    # Localizability: a trained model is more localizable than uniform (log2(1/4π) = -3.65 bits).
    assert (
        model.localizability["mean"]
        > uniform.localizability["mean"]
        == pytest.approx(-math.log2(4 * math.pi))
    )
    assert "by_bin" in model.localizability

    files = {p.name for p in out.iterdir()}
    assert {
        "report.json",
        "table.md",
        "predictions.parquet",
        "predictions.csv",
        "error_cdf.png",
        "localizability.png",
    } <= files
    for png in ("error_cdf.png", "localizability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert data["n"] == 240 and data["split"] == "test" and data["config"]["seeds"] == [0, 1]
    assert [r["name"] for r in data["rows"]] == ["ckpt", "uniform", "retrieval"]
    assert data["rows"][0]["metrics"]["dist_km"]["values"] == model.metrics["dist_km"]
    assert data["rows"][0]["nll"]["space"] == "sphere" and data["rows"][2]["nll"] is None
    table = (out / "table.md").read_text()
    assert "| Model | GeoScore | dist (km) | 25 km | 200 km | 750 km | 2500 km |" in table
    assert "| uniform | 1.22 | S² (per steradian) |" in table
    per_item = pq.read_table(out / "predictions.parquet").to_pandas()
    assert len(per_item) == 240 * (2 + 2 + 1)  # two seeds per model row, one for (deterministic) retrieval
    first = per_item[(per_item["model"] == "ckpt") & (per_item["seed"] == 0)]
    assert np.allclose(first["dist_km"].to_numpy(), model.scores[0].per_item["dist_km"])
    assert np.allclose(first["true_lat"].to_numpy(), report.data.latlon[:, 0])
    assert first["log_prob"].notna().all() and first["localizability_bits"].notna().all()
    assert per_item[per_item["model"] == "retrieval"]["log_prob"].isna().all()


def test_rows_of_the_same_checkpoint_get_distinct_names(tmp_path, copies_store):
    ckpt = tiny_checkpoint(tmp_path / "m", 16)
    cfg = dataclasses.replace(FAST, nll=False, steps=2)
    report = run_eval([copies_store], "test", checkpoints=[ckpt, ckpt], baselines=["uniform"], config=cfg)
    assert [r.name for r in report.rows] == ["m", "m-2", "uniform"]
    assert report.row("m").metrics == report.row("m-2").metrics  # same seed, same model: same numbers


@pytest.mark.parametrize("estimator", ["median", "best-of-n"])
def test_sample_based_estimators_run_through_the_same_driver(trained, estimator):
    ckpt, store = trained
    cfg = EvalConfig(
        estimator=estimator,
        n=8,
        seeds=(0,),
        steps=8,
        nll=False,
        prdc=False,
        likelihood=LikelihoodConfig(method="rk4", steps=4),
    )
    report = run_eval([store], "test", checkpoints=[ckpt], config=cfg)
    row = report.row("ckpt")
    assert row.info["estimator"] == estimator and row.info["omega"] == 0.0 and row.info["n"] == 8
    # Better than chance (uniform: 10,008 km); with 8 draws of a bimodal density no tighter claim holds.
    assert row.metrics["n_failed"] == [0] and row.stat("dist_km")[0] < 8000


def test_score_rows_takes_precomputed_arrays():
    rng = np.random.default_rng(0)
    gt = make_latlon(500, rng)
    pred = gt.copy()
    pred[:100] = np.nan
    data = EvalData(ids=np.array([f"x{i}" for i in range(500)], dtype=object), latlon=gt)
    row = RowPredictions(
        "pre",
        {"kind": "arrays"},
        [0],
        [pred],
        log_prob=np.full(500, -math.log(4 * math.pi)),
        nll_space="sphere",
    )
    report = score_rows(data, [row], EvalConfig(seeds=(0,), prdc=True, prdc_chunks=4))
    r = report.row("pre")
    assert r.metrics["n_failed"] == [100] and r.stat("acc_1km")[0] == pytest.approx(0.8)
    assert r.stat("precision_unchunked")[0] == 1.0  # failures are left out of PRDC, the rest are exact
    assert r.nll.bits_per_dim == pytest.approx(UNIFORM_NLL)


# ------------------------------------------------------------------------------------------------------------
# Layers: the core scorer never sees a store; the job opens each store once
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module", ["geoloc.evaluate", "geoloc.predictors", "geoloc.report", "geoloc.metrics", "geoloc.config"]
)
def test_core_eval_modules_do_not_import_the_pipeline(module):
    code = (
        f"import sys, {module}; bad = sorted(m for m in sys.modules if m.startswith(('geoloc.pipeline', "
        "'geoloc.cli'))); assert not bad, bad"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr


def test_a_full_eval_opens_each_store_once(tmp_path, monkeypatch):
    a, b = _copies_store(tmp_path / "a"), _copies_store(tmp_path / "b")
    ckpt = tiny_checkpoint(tmp_path / "m", 16, {"name": "test", "dim": 16})
    opened: list[Path] = []
    real_open = FeatureStore.open

    def counting_open(cls, root):
        opened.append(Path(root))
        return real_open(root)

    monkeypatch.setattr(FeatureStore, "open", classmethod(counting_open))
    cfg = dataclasses.replace(FAST, nll=False, steps=2, labels="none")
    report = run_eval(
        [a, b],
        "test",
        checkpoints=[ckpt],
        baselines=["uniform", "retrieval"],
        config=cfg,
        out_dir=tmp_path / "out",
        plots=False,
    )
    assert report.n == 600 and report.row("retrieval").info["database_rows"] == 600
    assert sorted(opened) == sorted([a, b])  # two reads (train for retrieval, test), one open each


@dataclasses.dataclass
class _Batch:
    ids: list
    cond: torch.Tensor
    latlon: np.ndarray
    labels: dict = dataclasses.field(default_factory=dict)

    def __len__(self):
        return len(self.ids)


def test_core_evaluate_takes_plain_batches_and_matches_the_store_path(copies_store):
    """The core pass on in-memory arrays gives the numbers the job gives on the store holding them."""
    from geoloc.evaluate import evaluate

    batches = list(iter_eval_batches([copies_store], "test", 64))
    train = list(iter_eval_batches([copies_store], "train", 1000))
    retr = RetrievalPredictor.from_arrays(
        torch.cat([t.cond for t in train]), np.concatenate([t.latlon for t in train])
    )
    plain = [_Batch(list(b.ids), b.cond.clone(), b.latlon.copy()) for b in batches]
    cfg = dataclasses.replace(FAST, seeds=(0, 1), batch_size=64)
    rows = {"u": uniform_geolocator(16), "r": retr}
    core = evaluate(rows, plain, cfg)
    job = evaluate_stores(
        {"u": uniform_geolocator(16), "r": retrieval_from_stores([copies_store])}, copies_store, "test", cfg
    )
    assert core.n == job.n == 300
    for name in ("u", "r"):
        assert core.row(name).metrics == job.row(name).metrics
    assert core.row("r").stat("dist_km") == (0.0, 0.0)
    assert core.row("u").nll.bits_per_dim == pytest.approx(UNIFORM_NLL, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Weighted retrieval, hybrid rows, several estimators, calibration (issue 13)
# ------------------------------------------------------------------------------------------------------------


def _decoy_store(root: Path, n: int = 60, dim: int = 16) -> Path:
    """Per test item: one train item that is its closest embedding but sits at the antipode (a decoy), and
    three slightly less similar ones at the true place. 1-NN is always 20,000 km off; three neighbours
    agree."""
    rng = np.random.default_rng(11)
    latlon = make_latlon(n, rng)
    base = rng.normal(size=(n, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    store = FeatureStore.create(root, BackboneInfo("test", "r", dim, {}))
    anti = np.stack([-latlon[:, 0], (latlon[:, 1] + 360.0) % 360.0 - 180.0], 1)
    emb, ll, ids = [], [], []
    for j, (scale, where) in enumerate([(0.1, anti), (0.2, latlon), (0.2, latlon), (0.2, latlon)]):
        emb.append(base + scale * rng.normal(size=base.shape) / math.sqrt(dim))
        ll.append(where)
        ids += [f"tr{j}-{i:03d}" for i in range(n)]
    emb, ll = np.concatenate(emb).astype(np.float32), np.concatenate(ll)
    store.write_shard(build_table(ids, "train", ll[:, 0], ll[:, 1], emb, None, ()), "a")
    test_ids = [f"te{i:03d}" for i in range(n)]
    store.write_shard(
        build_table(test_ids, "test", latlon[:, 0], latlon[:, 1], base.astype(np.float32), None, ()), "b"
    )
    return root


def test_weighted_retrieval_row_outvotes_a_decoy_that_fools_the_nearest_neighbour(tmp_path):
    store = _decoy_store(tmp_path / "s")
    given = dataclasses.replace(FAST, nll=False, retrieval_k=4, retrieval_tau=0.05)
    report = run_eval([store], "test", baselines=["retrieval", "retrieval-weighted"], config=given)
    nn, weighted = report.row("retrieval"), report.row("retrieval-weighted")
    assert nn.stat("dist_km")[0] == pytest.approx(math.pi * R, rel=1e-3)  # every 1-NN answer is the antipode
    assert weighted.stat("dist_km")[0] < 300 and weighted.stat("geoscore")[0] > 4500
    assert (
        weighted.info["k"] == 4 and weighted.info["tau"] == 0.05 and weighted.info["fit"] == {"how": "given"}
    )
    # Without k/τ (and no hybrid in the run) they are chosen leave-one-out on the training split: a decoy
    # there is answered by its three true-place neighbours, so the fit must find k > 1 (it never reads test).
    fitted = run_eval(
        [store], "test", baselines=["retrieval-weighted"], config=dataclasses.replace(FAST, nll=False)
    )
    row = fitted.row("retrieval-weighted")
    assert row.info["k"] > 1 and row.info["fit"]["how"] == "leave-one-out" and row.info["fit"]["items"] == 240
    assert row.stat("geoscore")[0] > nn.stat("geoscore")[0] + 3000


def _vmf_store_with_truths_drawn_from_it(store: Path, dim: int, n: int) -> Geolocator:
    """An untrained vMF geolocator and a ``test`` store of ``n`` items whose truths are draws from it."""
    geo = Geolocator.build(
        FamilyConfig(name="vmf"),
        ModelConfig(dim=16, depth=1, expansion=2),
        dim,
        config={"family": {"name": "vmf"}, "model": {"dim": 16, "depth": 1, "expansion": 2}, "cond_dim": dim},
    )
    torch.manual_seed(0)
    cond = torch.randn(n, dim)
    truth = geo.sample(cond, 1, generator=torch.Generator().manual_seed(1))[:, 0]
    ll = xyz_to_latlon(truth.double()).numpy()
    fs = FeatureStore.create(store, BackboneInfo("test", "r", dim, {}))
    fs.write_shard(
        build_table([f"t{i}" for i in range(n)], "test", ll[:, 0], ll[:, 1], cond.numpy(), None, ()), "t"
    )
    return geo


def test_hdr_calibration_of_a_model_whose_truths_are_drawn_from_it(tmp_path):
    """Coverage of the α-regions is α (within binomial noise) when the truth is a draw from the model."""
    dim, n = 8, 1200
    geo = _vmf_store_with_truths_drawn_from_it(tmp_path / "s", dim, n)
    cfg = EvalConfig(seeds=(0,), prdc=False, calibration=True, calibration_n=200)
    report = evaluate_stores({"vmf": geo, "uniform": uniform_geolocator(dim)}, tmp_path / "s", "test", cfg)
    cal = report.row("vmf").calibration
    for a in ("0.5", "0.9", "0.95"):
        alpha = float(a)
        se = math.sqrt(alpha * (1 - alpha) / n)
        assert abs(cal["coverage"][a] - alpha) < 4 * se + 1 / 200, (a, cal)
    assert cal["calibration_error"] < 0.03 and cal["n"] == n
    # A flat density ties every sample with the truth: its level is uniform (any region of α of the sphere
    # holds the truth with probability α), so it is calibrated — and as unsharp as a density can be (NLL).
    flat = report.row("uniform").calibration
    for a in ("0.5", "0.9", "0.95"):
        alpha = float(a)
        assert abs(flat["coverage"][a] - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / n), (a, flat)
    table = report.table_markdown()
    assert "**Calibration**" in table and "| Model | 50 % | 90 % | 95 % | cal. error |" in table
    cov = flat["coverage"]
    row = f"| uniform | {100 * cov['0.5']:.1f} | {100 * cov['0.9']:.1f} | {100 * cov['0.95']:.1f} | "
    assert row + f"{flat['calibration_error']:.3f} |" in table


def test_hybrid_checkpoint_rows_with_several_estimators_and_calibration(trained, tmp_path, monkeypatch):
    from geoloc.hybrid import HybridGeolocator
    from geoloc.pipeline.fit_hybrid import FitHybridConfig, fit_hybrid, load_hybrid

    ckpt, store = trained
    lik = LikelihoodConfig(method="rk4", steps=4)
    hyb = tmp_path / "hybrid"
    doc = fit_hybrid(
        ckpt,
        [store],
        hyb,
        FitHybridConfig(val_split="train", val_where="id LIKE 'tr1%'", ks=(4, 8), likelihood=lik),
    )
    cfg = EvalConfig(
        estimators=("sample", "geoscore"),
        n=16,
        seeds=(0,),
        steps=8,
        likelihood=lik,
        prdc=False,
        calibration=True,
        calibration_n=16,
    )
    out = tmp_path / "eval"
    # The hybrid solves the flow's likelihood only at its calibration draws (m = calibration_n points per
    # item): at the truths (m = 1) it takes the log-densities the flow's own row computed on the same batch.
    solved: list[int] = []
    flow_log_prob = HybridGeolocator.flow_log_prob

    def counting(self, x, cond):
        solved.append(x.shape[1])
        return flow_log_prob(self, x, cond)

    monkeypatch.setattr(HybridGeolocator, "flow_log_prob", counting)
    report = run_eval(
        [store],
        "test",
        checkpoints=[ckpt, hyb],
        baselines=["retrieval", "retrieval-weighted"],
        config=cfg,
        out_dir=out,
        plots=False,
    )
    names = [
        "ckpt[sample]",
        "ckpt[geoscore]",
        "hybrid[sample]",
        "hybrid[geoscore]",
        "retrieval",
        "retrieval-weighted",
    ]
    assert [r.name for r in report.rows] == names
    h = report.row("hybrid[geoscore]")
    assert h.info["kind"] == "hybrid" and h.info["estimator"] == "geoscore" and h.info["omega"] == 0.0
    assert report.row("hybrid[sample]").info["omega"] == 2.0
    # The weighted-retrieval row takes k and τ from the hybrid's validation fit, not from the test split.
    w = report.row("retrieval-weighted").info
    assert (w["k"], w["tau"]) == (doc["retrieval"]["k"], doc["retrieval"]["tau"]) and "validation fit" in w[
        "fit"
    ]["how"]
    assert solved and set(solved) == {16}
    monkeypatch.undo()
    # The hybrid's NLL is exactly its log-density of the truths (same likelihood ODE as the flow's row).
    model = load_hybrid(hyb)
    model.likelihood_config = lik
    xyz = latlon_to_xyz(torch.from_numpy(report.data.latlon)).float()
    cond = torch.cat([b.cond for b in iter_eval_batches([store], "test", 1000)])
    lp = model.log_prob(xyz, cond)
    assert h.nll.bits_per_dim == pytest.approx(float(-lp.double().mean() / (3 * math.log(2))), rel=1e-5)
    # Both rows of one model share its density: same NLL, and calibration for each density row only.
    assert report.row("hybrid[sample]").nll.bits_per_dim == pytest.approx(h.nll.bits_per_dim, rel=1e-6)
    for r in report.rows:
        assert (r.calibration is None) == r.name.startswith("retrieval")
        if r.calibration:
            assert set(r.calibration["coverage"]) == {"0.5", "0.9", "0.95"}
            assert 0.0 <= r.calibration["calibration_error"] <= 0.5
    # The hybrid's neighbours know the task's modes: its density beats the flow's alone.
    assert h.nll.bits_per_dim < report.row("ckpt[sample]").nll.bits_per_dim
    data = json.loads((out / "report.json").read_text())
    assert data["config"]["estimators"] == ["sample", "geoscore"]
    assert data["rows"][3]["calibration"]["coverage"]["0.9"] == h.calibration["coverage"]["0.9"]
    per_item = pq.read_table(out / "predictions.parquet").to_pandas()
    assert per_item[per_item["model"] == "hybrid[geoscore]"]["hdr_level"].between(0, 1).all()
    assert "**Calibration**" in (out / "table.md").read_text()


def test_calibration_on_a_hash_sample_of_the_items(tmp_path):
    """``calibration_items`` limits the costly calibration to about that many items, a uniform sample by id
    hash (not the first items of a store that may be sorted): exactly the ids the hash rule picks have
    levels, in every batch; the rest of the per-item file is null; the table says how many."""
    from geoloc.subsample import in_hash_sample

    dim, n = 8, 300
    geo = _vmf_store_with_truths_drawn_from_it(tmp_path / "s", dim, n)
    base = EvalConfig(seeds=(0,), prdc=False, calibration=True, calibration_n=50, batch_size=64)
    full = evaluate_stores({"vmf": geo}, tmp_path / "s", "test", base)
    part = evaluate_stores(
        {"vmf": geo}, tmp_path / "s", "test", dataclasses.replace(base, calibration_items=100)
    )
    lv_full, lv_part = full.row("vmf").predictions.hdr_level, part.row("vmf").predictions.hdr_level
    assert len(lv_full) == n and len(lv_part) == n and np.isfinite(lv_full).all()
    picked = in_hash_sample(part.data.ids, 100 / n)
    assert np.array_equal(np.isfinite(lv_part), picked)
    m = int(picked.sum())
    assert 70 <= m <= 130 and part.row("vmf").calibration["n"] == m
    pos = np.flatnonzero(picked)
    assert pos.min() < 64 and pos.max() >= 256  # spread over the batches, not the first 100
    assert f"on {m:,} items sampled by id hash" in part.table_markdown()
    part.write(tmp_path / "out")
    tab = pq.read_table(next((tmp_path / "out").glob("*.parquet")))
    assert tab.column("hdr_level").null_count == n - m
    with pytest.raises(ConfigError):
        EvalConfig(calibration_items=-1)
