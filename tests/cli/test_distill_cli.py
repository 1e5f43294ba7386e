"""`geoloc distill` end to end: a checkpoint trained on a store → a distilled checkpoint that loads, samples
one-pass at its ω and stays the teacher elsewhere; bad options fail with one line before any work."""

import json

import torch
from typer.testing import CliRunner

from geoloc.checkpoint import read_config
from geoloc.cli import app
from geoloc.distill import GuidanceDistilled
from geoloc.geolocator import Geolocator
from tests.helpers import make_store

runner = CliRunner()
FAST = ["--set", "model.dim=32", "--set", "model.depth=2", "--batch-size", "64", "--dtype", "fp32"]


def test_distill_a_trained_checkpoint(tmp_path):
    make_store(tmp_path / "store", 400, 16, shards=2)
    teacher = tmp_path / "run"
    r = runner.invoke(
        app, ["train", "--store", str(tmp_path / "store"), "--out", str(teacher), "--steps", "20", *FAST]
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "distilled"
    args = ["distill", "--checkpoint", str(teacher), "--out", str(out), "--steps", "40", "--batch-size", "64"]
    r = runner.invoke(app, [*args, "--lr", "1e-3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "guided-field error" in r.output
    cfg = read_config(out)
    rec = cfg["distilled"]
    assert rec["omega"] == 2.0 and rec["steps"] == 40 and rec["teacher"] == str(teacher)
    assert rec["stores"] == [str(tmp_path / "store")]
    assert rec["field_error_after"] < rec["field_error_before"]
    assert cfg["model"] == read_config(teacher)["model"]
    losses = [json.loads(line)["loss"] for line in (out / "distill_metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])
    # The teacher's weights are carried unchanged; the distilled checkpoint samples like the teacher at ω = 0.
    geo_t, geo_d = Geolocator.from_pretrained(teacher), Geolocator.from_pretrained(out)
    assert isinstance(geo_d.net, GuidanceDistilled)
    cond = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    a = geo_t.sample(cond, 2, omega=0.0, steps=4, generator=torch.Generator().manual_seed(1))
    b = geo_d.sample(cond, 2, omega=0.0, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # A second run refuses to overwrite without --force, and a distilled checkpoint is not a teacher.
    r = runner.invoke(app, [*args, "--no-progress"])
    assert r.exit_code != 0 and "--force" in str(r.exception)
    r = runner.invoke(
        app, ["distill", "--checkpoint", str(out), "--out", str(tmp_path / "again"), "--steps", "1"]
    )
    assert r.exit_code != 0 and "already guidance-distilled" in str(r.exception)


def test_bad_options_fail_before_any_work(tmp_path):
    missing = tmp_path / "nope"
    for opts, words in (
        (["--steps", "0"], "steps must be ≥ 1"),
        (["--omega", "0"], "omega must be > 0"),
        (["--batch-size", "-3"], "batch_size must be ≥ 1"),
    ):
        r = runner.invoke(app, ["distill", "--checkpoint", str(missing), "--out", str(tmp_path / "o"), *opts])
        assert r.exit_code != 0 and words in str(r.exception), (opts, r.exception)
    r = runner.invoke(app, ["distill", "--checkpoint", str(missing), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no config.json" in str(r.exception)
    assert not (tmp_path / "o").exists()
