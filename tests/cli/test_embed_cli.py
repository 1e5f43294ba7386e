"""`geoloc embed` through the real Typer app: options reach the job, the summary prints, exit codes follow
the failure-rate threshold, and user errors stop at the one error boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from geoloc.cli import app
from geoloc.pipeline.store import FeatureStore
from tests.pipeline.test_embed import make_dataset

runner = CliRunner()


def _embed(*args: str):
    return runner.invoke(
        app,
        [
            "embed",
            *args,
            "--backbone",
            "tiny-random",
            "--num-workers",
            "0",
            "--batch-size",
            "4",
            "--dtype",
            "fp32",
            "--no-progress",
        ],
    )


def test_embed_writes_a_store_and_prints_a_summary(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=9)
    res = _embed(
        str(ds.manifest),
        "--store",
        str(tmp_path / "s"),
        "--split",
        "train",
        "--shard-size",
        "5",
        "--max-failure-rate",
        "0.5",
    )
    assert res.exit_code == 0, res.output
    assert "embedded 13 item(s) with tiny-random" in res.output and "failed 4 item(s)" in res.output
    store = FeatureStore.open(tmp_path / "s")
    assert store.rows_per_split() == {"train": 13} and len(store.shard_records) == 3  # 5 + 5 + 3
    again = _embed(str(ds.manifest), "--store", str(tmp_path / "s"), "--split", "test")
    assert (
        again.exit_code == 0
        and "embedded 3 item(s)" in again.output
        and "13 were already there" in again.output
    )


def test_failure_rate_above_the_limit_exits_non_zero(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=2)  # 4 of 13 items fail
    res = _embed(str(ds.manifest), "--store", str(tmp_path / "s"))
    assert res.exit_code == 1
    assert "30.77% of items failed (limit 5.00%)" in res.output
    assert FeatureStore.open(tmp_path / "s").num_rows() == 9  # the good work is kept


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_good=2, bad=False)
    code = "import sys; from geoloc.cli import main; sys.argv = ['geoloc'] + sys.argv[1:]; main()"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "embed",
            str(ds.manifest),
            "--store",
            str(tmp_path / "s"),
            "--backbone",
            "streetclp",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: unknown backbone 'streetclp' (did you mean 'streetclip'?); "
        "choose one of ['dinov2-l-reg', 'minilm', 'streetclip', "
        "'tiny-random'] or open_clip:ARCH/TAG"
    ]


def test_help_has_summary_and_example() -> None:
    res = runner.invoke(app, ["embed", "--help"], env={"COLUMNS": "200"})  # rich wraps to the terminal
    assert res.exit_code == 0
    for word in (
        "--store",
        "--split",
        "--backbone",
        "--weights",
        "--shard-size",
        "--engine",
        "--max-failure-rate",
        "Example",
        "geoloc embed demo-geonames",
    ):
        assert word in res.output, word
