"""`geoloc train` end to end on a feature store: config, provenance, resume, fine-tuning, bad input."""

import json

from typer.testing import CliRunner

from geoloc.checkpoint import read_config
from geoloc.cli import app
from tests.helpers import make_store

runner = CliRunner()
FAST = [
    "--set",
    "model.dim=32",
    "--set",
    "model.depth=2",
    "--batch-size",
    "64",
    "--dtype",
    "fp32",
    "--set",
    "log_every=5",
    "--set",
    "eval_every=10",
    "--set",
    "val_samples=64",
]


def test_train_on_a_store_then_resume_and_finetune(tmp_path):
    make_store(tmp_path / "store", 600, 16, shards=3)
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "train",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(out),
            "--steps",
            "10",
            "--val-split",
            "val",
            *FAST,
        ],
    )
    assert r.exit_code == 0, r.output
    cfg = read_config(out)
    assert cfg["step"] == 10 and cfg["cond_dim"] == 16
    assert cfg["backbone"]["name"] == "test" and cfg["data"]["rows"] > 0
    assert cfg["train"]["data"]["stores"] == [str(tmp_path / "store")]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_geoscore" in rec for rec in logged)
    # resume to more steps
    r = runner.invoke(
        app, ["train", "--store", str(tmp_path / "store"), "--out", str(out), "--steps", "15", *FAST]
    )
    assert r.exit_code == 0, r.output
    assert read_config(out)["step"] == 15
    # fine-tune a filtered subset from the checkpoint
    r = runner.invoke(
        app,
        [
            "train",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "ft"),
            "--steps",
            "5",
            "--init-from",
            str(out),
            "--where",
            "unique_country IS NOT NULL",
            *FAST,
        ],
    )
    assert r.exit_code == 0, r.output
    assert read_config(tmp_path / "ft")["init_from"] == str(out)


def test_train_errors_are_one_line(tmp_path):
    make_store(tmp_path / "store", 200, 16, shards=1)
    r = runner.invoke(
        app, ["train", "--store", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *FAST]
    )
    assert r.exit_code != 0
    r = runner.invoke(
        app,
        [
            "train",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "optim.lrr=1",
            *FAST,
        ],
    )
    assert r.exit_code != 0 and "did you mean `optim.lr`" in str(r.exception)
    # a checkpoint with another condition width cannot initialise this run
    make_store(tmp_path / "wide", 200, 24, shards=1)
    r = runner.invoke(
        app, ["train", "--store", str(tmp_path / "wide"), "--out", str(tmp_path / "w"), "--steps", "2", *FAST]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "train",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "x"),
            "--steps",
            "2",
            "--init-from",
            str(tmp_path / "w"),
            *FAST,
        ],
    )
    assert r.exit_code != 0 and "24" in str(r.exception) and "16" in str(r.exception)


def test_bad_steps_and_init_from_into_itself_are_one_line_errors(tmp_path):
    make_store(tmp_path / "store", 200, 16, shards=1)
    for steps in ("0", "-5"):
        r = runner.invoke(
            app,
            [
                "train",
                "--store",
                str(tmp_path / "store"),
                "--out",
                str(tmp_path / "o"),
                "--steps",
                steps,
                *FAST,
            ],
        )
        assert (
            r.exit_code != 0
            and f"--steps must be a positive number of training steps, got {steps}" in str(r.exception)
        )
        assert not (tmp_path / "o" / "model.safetensors").exists()  # no untrained checkpoint
    r = runner.invoke(
        app,
        ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "o"), "--steps", "2", *FAST],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "train",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "o"),
            "--steps",
            "4",
            "--init-from",
            str(tmp_path / "o"),
            *FAST,
        ],
    )
    assert (
        r.exit_code != 0
        and "are the same directory" in str(r.exception)
        and "pick another --out" in str(r.exception)
    )


def test_a_short_finetune_schedule_decays():
    from dataclasses import replace

    from geoloc.config import TrainConfig
    from geoloc.pipeline.train_job import fit_finetune_schedule
    from geoloc.train import lr_at

    cfg = replace(TrainConfig(), steps=100)
    cfg = replace(cfg, optim=replace(cfg.optim, warmup_steps=500, lr=1.0))
    fitted = fit_finetune_schedule(cfg)
    assert fitted.optim.warmup_steps == 10
    assert lr_at(99, 1.0, fitted.optim.warmup_steps, 100) < 0.01  # ends decayed, not at the peak
    assert lr_at(99, 1.0, 500, 100) > 0.19  # what the unfitted schedule did
    long = replace(cfg, steps=100_000)
    assert fit_finetune_schedule(long).optim.warmup_steps == 500  # long runs keep the preset's warm-up


def test_interrupt_writes_a_checkpoint_and_resume_truncates_metrics(tmp_path, monkeypatch):
    """Ctrl-C (SIGTERM maps to it) at step 7 of a run that checkpoints every 500: a checkpoint at step 7; a
    resumed metrics.jsonl holds each step once and says where it resumed."""
    import pytest

    import geoloc.train as train_mod
    from geoloc.pipeline.train_job import run_train
    from geoloc.presets import resolve_config

    make_store(tmp_path / "store", 300, 16, shards=1)
    cfg = resolve_config(
        "small",
        None,
        [
            "steps=20",
            "log_every=1",
            "data.batch_size=32",
            "model.dim=32",
            "model.depth=2",
            "dtype=fp32",
            f"data.stores={tmp_path / 'store'}",
        ],
    )
    calls = {"n": 0}
    real = train_mod.lr_at

    def lr_then_interrupt(step, *a):
        calls["n"] += 1
        if step == 7:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(train_mod, "lr_at", lr_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, tmp_path / "run", progress=False)
    assert read_config(tmp_path / "run")["step"] == 7
    log = tmp_path / "run" / "metrics.jsonl"
    # A crash after the checkpoint would have logged steps past it: simulate two such lines.
    log.write_text(
        log.read_text() + json.dumps({"step": 8, "loss": 1.0}) + "\n" + json.dumps({"step": 9}) + "\n"
    )
    monkeypatch.setattr(train_mod, "lr_at", real)
    run_train(cfg, tmp_path / "run", progress=False)
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r["step"] for r in recs if "step" in r]
    assert steps == list(range(1, 21))  # every step once, in order
    assert {"resumed_at_step": 7} in recs
