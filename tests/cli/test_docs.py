"""Docs cannot drift from the CLI: every command has help with an example and appears in the README."""

from pathlib import Path

import typer
from typer.testing import CliRunner

from geoloc.cli import app

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
runner = CliRunner()


def _commands(typer_app: typer.Typer, prefix: str = "") -> list[str]:
    names = [prefix + (c.name or c.callback.__name__) for c in typer_app.registered_commands]
    for group in typer_app.registered_groups:
        names += _commands(group.typer_instance, prefix + group.name + " ")
    return names


def test_every_command_has_help_and_is_documented():
    commands = _commands(app)
    assert {
        "embed",
        "train",
        "eval",
        "predict",
        "store info",
        "store import",
        "gazetteer build",
        "convert plonk",
        "demo",
    } <= set(commands), commands
    for cmd in commands:
        r = runner.invoke(app, [*cmd.split(), "--help"])
        assert r.exit_code == 0, (cmd, r.output)
        assert "Example" in r.output or "example" in r.output, f"`geoloc {cmd} --help` has no example"
        assert f"geoloc {cmd.split()[0]}" in README, f"`geoloc {cmd}` is not in the README"


def test_main_turns_library_errors_into_one_line(tmp_path, capfd):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "geoloc.cli", "store", "info", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
