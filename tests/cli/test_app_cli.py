"""The root command: help rendered as written, --version, and `train` printing its config as JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from geoloc import __version__
from geoloc.cli import app, keep_blocks

runner = CliRunner()


def _help(*cmd: str) -> str:
    r = runner.invoke(app, [*cmd, "--help"], terminal_width=100)
    assert r.exit_code == 0, r.output
    return r.output


def test_help_keeps_brackets_and_example_lines():
    assert "FLOAT[dim]" in _help("store", "sql")  # rich markup used to eat "[dim]"
    assert "[default: ~/.cache/geoloc]" in _help("gazetteer", "build")  # and the whole bracket
    text = _help("predict")
    # each example stays on its own line, as written (not rewrapped into one paragraph)
    assert (
        "\n      geoloc predict --checkpoint runs/demo --text Springfield --text Paris --maps maps/ " in text
    )
    assert "\n      geoloc predict demo-geonames --split test --limit 50" in text
    assert "<sample|median|geoscore|mode|mean|best-of-n>" in text  # estimator choices from config


def test_keep_blocks_marks_only_indented_paragraphs():
    doc = "Title line.\n\nProse that may be\nrewrapped.\n\nExample:\n    geoloc a\n    geoloc b\n"
    assert (
        keep_blocks(doc)
        == "Title line.\n\nProse that may be\nrewrapped.\n\n\b\nExample:\n    geoloc a\n    geoloc b"
    )
    assert keep_blocks(None) is None


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"geoloc {__version__}"


def test_train_prints_its_config_as_json(tmp_path):
    r = runner.invoke(
        app, ["train", "--store", str(tmp_path / "no-store"), "--out", str(tmp_path / "run"), "--steps", "3"]
    )
    line = next(x for x in r.output.splitlines() if x.startswith("config: "))
    cfg = json.loads(line.removeprefix("config: "))
    assert cfg["steps"] == 3 and cfg["data"]["stores"]
