"""`geoloc demo`: the offline end-to-end run behind `just demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoloc.cli.options import default
from geoloc.config import DemoConfig


def demo_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (reused by a second run).")
    ] = default(DemoConfig, "out_dir"),
    limit: Annotated[int, typer.Option(help="GeoNames places to embed.")] = default(DemoConfig, "limit"),
    steps: Annotated[int, typer.Option(help="Training steps of the RFM model.")] = default(
        DemoConfig, "steps"
    ),
    maps: Annotated[bool, typer.Option(help="Draw density maps.")] = default(DemoConfig, "maps"),
) -> None:
    """Run embed → train → eval → density maps offline on GeoNames place names with MiniLM.

    Example:

        geoloc demo --out demo_out
    """
    from geoloc.pipeline.demo_job import run_demo  # torch, the backbones and training: not for --help

    report = run_demo(DemoConfig(out_dir=out, limit=limit, steps=steps, maps=maps))
    typer.echo("\n" + report.table)
    for text, top in report.top_places.items():
        parts = "; ".join(f"{m:.0%} near {label} ({lat:.1f}, {lon:.1f})" for lat, lon, m, label in top)
        typer.echo(f"  {text!r}: {parts}")
    typer.echo(f"\nmaps: {', '.join(str(p) for p in report.maps) or '(none)'}")
    typer.echo(f"evaluation: {out / 'eval'} (report.json, table.md, predictions.parquet, error_cdf.png)")
    typer.echo("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.timings_s.items()))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
