"""`geoloc eval`, driven in-process against a store and checkpoints built in the test."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from geoloc.cli import app
from geoloc.config import FamilyConfig, ModelConfig
from geoloc.errors import BackboneError, ConfigError
from geoloc.geolocator import Geolocator
from tests.helpers import make_store

runner = CliRunner()


def _checkpoint(path, cond_dim, backbone=None):
    cfg = {
        "family": {"name": "rfm-s2"},
        "model": {"dim": 32, "depth": 1, "expansion": 2},
        "cond_dim": cond_dim,
    }
    if backbone:
        cfg["backbone"] = backbone
    Geolocator.build(
        FamilyConfig(name="rfm-s2"), ModelConfig(dim=32, depth=1, expansion=2), cond_dim, config=cfg
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "store"
    make_store(root, 400, 8, splits={"train": 0.5, "test": 0.5}, label_columns=())
    return root


def _run(*args):
    return runner.invoke(app, ["eval", *(str(a) for a in args)])


def test_eval_end_to_end(tmp_path, store):
    ckpt = _checkpoint(tmp_path / "rfm", 8, {"name": "test", "dim": 8})
    out = tmp_path / "out"
    r = _run(
        "--store",
        store,
        "--split",
        "test",
        "--checkpoint",
        ckpt,
        "--baseline",
        "uniform",
        "--baseline",
        "retrieval",
        "--out",
        out,
        "--seeds",
        "0,1",
        "--steps",
        "4",
        "--nll-steps",
        "2",
        "--csv",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "**Table 1** (YFCC4k layout" in r.stdout and "**Table 2**" in r.stdout
    for name in ("rfm", "uniform", "retrieval"):
        assert f"| {name} |" in r.stdout
    assert (out / "table.md").read_text() in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 200 and [row["name"] for row in report["rows"]] == ["rfm", "uniform", "retrieval"]
    assert report["config"]["seeds"] == [0, 1] and report["config"]["steps"] == 4
    uniform = report["rows"][1]
    assert uniform["nll"]["bits_per_dim"] == pytest.approx(math.log2(4 * math.pi) / 3, abs=1e-6)
    assert len(uniform["metrics"]["dist_km"]["values"]) == 2
    assert pq.read_metadata(out / "predictions.parquet").num_rows == 200 * (2 + 2 + 1)
    assert (out / "predictions.csv").read_text().startswith('"model","seed","id"')
    assert (out / "error_cdf.png").stat().st_size > 0
    assert not (out / "localizability.png").exists()


def test_eval_errors_are_one_line_and_typed(tmp_path, store):
    other = _checkpoint(tmp_path / "dino", 8, {"name": "dinov2-l-reg", "dim": 8})
    r = _run("--store", store, "--checkpoint", other, "--out", tmp_path / "o")
    assert r.exit_code == 1 and isinstance(r.exception, BackboneError)
    assert "'dinov2-l-reg'" in str(r.exception) and "'test'" in str(r.exception)
    r = _run("--store", store, "--baseline", "uniform", "--labels", "country=nope", "--out", tmp_path / "o")
    assert isinstance(r.exception, ConfigError) and "unknown label column 'nope'" in str(r.exception)
    r = _run("--store", store, "--baseline", "uniform", "--seeds", "0,x", "--out", tmp_path / "o")
    assert isinstance(r.exception, ConfigError) and "--seeds" in str(r.exception)
    r = _run("--store", store, "--out", tmp_path / "o")
    assert isinstance(r.exception, ConfigError) and "nothing to evaluate" in str(r.exception)


def test_eval_help_has_examples():
    r = runner.invoke(app, ["eval", "--help"])
    assert r.exit_code == 0 and "Example" in r.stdout and "--baseline" in r.stdout


def test_eval_defaults_and_choices_come_from_evalconfig():
    import typer.main

    from geoloc.config import BASELINES, ESTIMATOR_CHOICES, TABLE_LAYOUTS, EvalConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["eval"].params}
    cfg = EvalConfig()
    defaults = {k: str(getattr(p.default, "value", p.default)) for k, p in params.items()}
    assert defaults["samples"] == str(cfg.n) and defaults["steps"] == str(cfg.steps)
    assert defaults["batch_size"] == str(cfg.batch_size) and defaults["seeds"] == ",".join(
        map(str, cfg.seeds)
    )
    assert defaults["estimator"] == cfg.estimator and defaults["nll_steps"] == str(cfg.likelihood.steps)
    # Choice lists: a wrong value is refused with exactly the config's choices offered.
    for flag, choices in (
        ("--estimator", ESTIMATOR_CHOICES),
        ("--baseline", BASELINES),
        ("--table", TABLE_LAYOUTS),
    ):
        r = runner.invoke(app, ["eval", "--store", "s", "--out", "o", flag, "nope"])
        assert r.exit_code == 2
        text = " ".join(r.output.split())
        assert all(f"'{c}'" in text for c in choices), text


def test_eval_several_estimators_weighted_retrieval_and_calibration(tmp_path, store):
    ckpt = _checkpoint(tmp_path / "rfm", 8, {"name": "test", "dim": 8})
    out = tmp_path / "out"
    r = _run(
        "--store",
        store,
        "--split",
        "test",
        "--checkpoint",
        ckpt,
        "--estimators",
        "sample,median",
        "--samples",
        "4",
        "--baseline",
        "retrieval",
        "--baseline",
        "retrieval-weighted",
        "--retrieval-k",
        "8",
        "--retrieval-tau",
        "0.1",
        "--calibration",
        "--calibration-samples",
        "8",
        "--out",
        out,
        "--seeds",
        "0",
        "--steps",
        "2",
        "--nll-steps",
        "2",
        "--no-prdc",
        "--no-plots",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == [
        "rfm[sample]",
        "rfm[median]",
        "retrieval",
        "retrieval-weighted",
    ]
    assert [row["estimator"] for row in report["rows"][:2]] == ["sample", "median"]
    assert report["rows"][3]["k"] == 8 and report["rows"][3]["tau"] == 0.1
    cal = report["rows"][0]["calibration"]
    assert set(cal["coverage"]) == {"0.5", "0.9", "0.95"} and cal["n"] == 200
    assert report["rows"][2]["calibration"] is None
    assert "**Calibration**" in r.stdout and "| rfm[median] |" in r.stdout
    bad = _run("--store", store, "--out", out, "--checkpoint", ckpt, "--estimators", "sample,nope")
    assert isinstance(bad.exception, ConfigError) and "nope" in str(bad.exception)
    half = _run("--store", store, "--out", out, "--baseline", "retrieval-weighted", "--retrieval-k", "4")
    assert isinstance(half.exception, ConfigError) and "--retrieval-tau" in str(half.exception)
