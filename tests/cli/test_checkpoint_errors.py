"""A checkpoint whose config.json no longer fits its weights (issue 11): one line naming the checkpoint and
what differs, from every command that loads one (`predict`, `eval`, `train --init-from`, resuming), instead
of torch's size-mismatch dump (37 lines for a small network)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from geoloc.cli import app
from geoloc.errors import CheckpointError
from geoloc.geolocator import Geolocator
from tests.helpers import make_store

runner = CliRunner()
FAST = (
    "--set model.dim=32 --set model.depth=2 --batch-size 64 --dtype fp32 "
    "--set log_every=5 --set eval_every=100"
)


def _cli(*args):
    """Run ``geoloc`` in-process; ``str`` arguments with spaces are split into words."""
    words = [w for a in args for w in (a.split() if isinstance(a, str) else [str(a)])]
    return runner.invoke(app, words)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store of 16-d features and a 2-step run on it (dim 32, depth 2)."""
    root = tmp_path_factory.mktemp("ckpt")
    make_store(root / "store", 300, 16, splits={"train": 0.7, "test": 0.3}, shards=1, label_columns=())
    r = _cli("train --store", root / "store", "--out", root / "run", "--steps 2", FAST)
    assert r.exit_code == 0, r.output
    return root


def _edited(src, dst, **model):
    """A copy of checkpoint ``src`` whose config.json's model fields are changed to ``model``."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model"].update(model)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _one_line(exc, ckpt) -> str:
    assert isinstance(exc, CheckpointError), repr(exc)
    text = str(exc)
    assert "\n" not in text and len(text) < 400, text
    assert str(ckpt) in text and "config.json" in text
    return text


def test_an_edited_dim_is_one_line_for_eval_predict_and_init_from(tmp_path, trained):
    bad = _edited(trained / "run", tmp_path / "bad", dim=48)
    with pytest.raises(CheckpointError) as e:
        Geolocator.from_pretrained(bad)
    text = _one_line(e.value, bad)
    # the first tensor that differs, with its shape in the weights and the one config.json implies
    assert "tensors have another shape" in text and "32" in text and "48" in text

    r = _cli(
        "eval --store",
        trained / "store",
        "--split test --checkpoint",
        bad,
        "--out",
        tmp_path / "e",
        "--no-progress",
    )
    assert r.exit_code == 1
    _one_line(r.exception, bad)

    (tmp_path / "x.png").write_bytes(b"")
    r = _cli("predict -c", bad, tmp_path / "x.png", "--backbone tiny-random --no-progress --device cpu")
    assert r.exit_code == 1
    _one_line(r.exception, bad)

    # A fine-tune whose settings match the edited config.json: the weights still do not fit.
    r = _cli(
        "train --store",
        trained / "store",
        "--out",
        tmp_path / "ft",
        "--init-from",
        bad,
        "--steps 2",
        FAST,
        "--set model.dim=48",
    )
    assert r.exit_code == 1
    assert f"--init-from {bad}" in _one_line(r.exception, bad)
    assert not (tmp_path / "ft" / "model.safetensors").exists()


def test_an_edited_depth_names_the_missing_tensors(tmp_path, trained):
    bad = _edited(trained / "run", tmp_path / "deep", depth=3)
    with pytest.raises(CheckpointError) as e:
        Geolocator.from_pretrained(bad)
    assert "missing from the weights" in _one_line(e.value, bad)
    shallow = _edited(trained / "run", tmp_path / "shallow", depth=1)
    with pytest.raises(CheckpointError) as e:
        Geolocator.from_pretrained(shallow)
    assert "not in this architecture" in _one_line(e.value, shallow)


def test_resuming_a_run_whose_weights_were_swapped_is_one_line(tmp_path, trained):
    # A run directory holding another architecture's weights (copied over by hand) under its own config.json.
    run = tmp_path / "run"
    r = _cli("train --store", trained / "store", "--out", run, "--steps 2", FAST, "--set model.dim=48")
    assert r.exit_code == 0, r.output
    for name in ("model.safetensors", "model_raw.safetensors"):
        shutil.copy(trained / "run" / name, run / name)
    r = _cli("train --store", trained / "store", "--out", run, "--steps 4", FAST, "--set model.dim=48")
    assert r.exit_code == 1
    _one_line(r.exception, run)
