"""`geoloc predict`: where are these images (or place names)? A table or JSON, CSV/Parquet, GeoJSON, density
maps and density cells.

Thin by design: options (defaults and choices from :class:`~geoloc.config.PredictOptions`,
:class:`~geoloc.config.MapOptions` and the config ``Literal`` s) → checks of the outputs and texts (before
any model loads) → :func:`~geoloc.pipeline.predict_job.run_predict` → :mod:`geoloc.export` /
:func:`~geoloc.pipeline.predict_job.write_maps` → the answers on stdout, everything else on stderr. torch and
the backbones load inside the command (lazy: `geoloc --help` stays fast).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from geoloc.cli.options import DeviceOpt, ProgressOpt, choice_enum, default
from geoloc.config import EstimatorName, MapOptions, PredictFormat, PredictOptions, choices
from geoloc.config import MapFormat as MapFormatChoice

MapFormat = choice_enum("MapFormat", MapFormatChoice)
Estimator = choice_enum("Estimator", EstimatorName)
OutputFormat = choice_enum("OutputFormat", PredictFormat)


def register(app: typer.Typer) -> None:
    """Add `geoloc predict`."""
    app.command("predict")(predict)


def _log(message: str) -> None:
    """Everything but the answers goes to stderr, so that stdout can be piped (``--format json | jq``)."""
    typer.echo(message, err=True)


def predict(
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint",
            "-c",
            help="Checkpoint directory (geoloc train or geoloc convert plonk), or a hybrid's (holds "
            "hybrid.json).",
            show_default=False,
        ),
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files, folders of images, or dataset "
            "manifests (a .toml path or a shipped name); - reads "
            "one per line from stdin (texts for a text "
            "backbone).",
            show_default=False,
        ),
    ] = None,
    text: Annotated[
        list[str] | None,
        typer.Option(
            "--text",
            help="A text to locate (text backbones such as "
            "minilm); repeat for several; - reads one per line from "
            "stdin.",
        ),
    ] = None,
    text_file: Annotated[
        list[Path] | None,
        typer.Option(
            "--text-file",
            help="A UTF-8 file of texts, one per line (blank lines skipped); repeatable.",
            dir_okay=False,
        ),
    ] = None,
    estimator: Annotated[
        Estimator,
        typer.Option(
            help="Point estimate: geoscore (default: the draw maximising the expected GeoScore, the best "
            "answer), sample (one guided draw, ω=2: the paper's protocol and geoloc eval's default; labelled "
            "as such, since it is not drawn from the distribution the modes describe), or another statistic "
            "of the model's draws."
        ),
    ] = Estimator(default(PredictOptions, "estimator")),
    regions: Annotated[
        bool,
        typer.Option(
            help="Report the areas (km²) of the 50% and 90% highest-density regions (exact likelihoods of "
            "--region-samples draws)."
        ),
    ] = default(PredictOptions, "regions"),
    region_samples: Annotated[
        int, typer.Option(help="Exact draws behind the region areas.", min=2)
    ] = default(PredictOptions, "region_samples"),
    top_k: Annotated[
        int, typer.Option(help="Distinct locations to report per item, with their mass.", min=0)
    ] = default(PredictOptions, "top_k"),
    samples: Annotated[
        int, typer.Option(help="Model draws behind the top-k and sample-based estimators.", min=1)
    ] = default(PredictOptions, "samples"),
    steps: Annotated[
        int | None,
        typer.Option(
            help="Sampler steps (the paper: 250; the default scored within noise of 250 "
            "on bench/bench_nfe.py's known-density task at 7-8x the speed).",
            min=1,
        ),
    ] = default(PredictOptions, "steps"),
    omega: Annotated[
        float | None,
        typer.Option(help="Guidance weight for the estimate (default: 2 for sample, 0 otherwise)."),
    ] = default(PredictOptions, "omega"),
    localizability: Annotated[
        bool,
        typer.Option(help="Also estimate localizability (bits; an exact-likelihood ODE per sample, slow)."),
    ] = default(PredictOptions, "localizability"),
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            "-f",
            help="What stdout gets: table, json "
            "(one list) or jsonl (one object per line); progress "
            "and messages go to stderr.",
        ),
    ] = OutputFormat(choices(PredictFormat)[0]),
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write rows to a .csv or .parquet file.")
    ] = None,
    geojson: Annotated[Path | None, typer.Option(help="Write a GeoJSON FeatureCollection.")] = None,
    maps: Annotated[Path | None, typer.Option(help="Write a density map per item into this folder.")] = None,
    density_out: Annotated[
        Path | None,
        typer.Option(
            help="Write the density maps' H3 cells (one row or "
            "polygon per cell, tagged with item_id and query) "
            "to a .parquet or .geojson file."
        ),
    ] = None,
    max_maps: Annotated[
        int, typer.Option(help="At most this many maps (each costs an adaptive likelihood grid).", min=0)
    ] = default(MapOptions, "max_maps"),
    map_format: Annotated[
        MapFormat, typer.Option(help="png, html (self-contained SVG) or both.")
    ] = MapFormat(default(MapOptions, "format")),
    map_steps: Annotated[
        int,
        typer.Option(
            help="RK4 steps of the likelihood ODE for maps (the map's title "
            "shows its total mass as a check).",
            min=1,
        ),
    ] = default(MapOptions, "steps"),
    map_start: Annotated[
        int,
        typer.Option(
            help="H3 resolution of the first, global grid (0: 122 cells, cheaper; 1: 842).", min=0, max=4
        ),
    ] = default(MapOptions, "start_resolution"),
    map_levels: Annotated[
        int,
        typer.Option(
            help="Refinement levels of the H3 grid (finest resolution = start + levels).", min=0, max=10
        ),
    ] = default(MapOptions, "levels"),
    trajectories: Annotated[
        int,
        typer.Option(
            help="Overlay the denoising paths of this many samples on the maps (flow families).", min=0
        ),
    ] = default(MapOptions, "trajectories"),
    split: Annotated[
        list[str] | None, typer.Option("--split", help="Manifest split(s) to read (default: all).")
    ] = None,
    root: Annotated[Path | None, typer.Option(help="Dataset root (overrides the manifest's).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items.", min=1)] = None,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone name (default: the one config.json records).")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Local backbone weights instead of the offline Hugging Face cache.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Inputs per backbone batch.", min=1)] = default(
        PredictOptions, "batch_size"
    ),
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the model's draws (reproducible output).")] = default(
        PredictOptions, "seed"
    ),
    max_failure_rate: Annotated[
        float,
        typer.Option(
            help="Exit 1 if more than this fraction of the items fail (0: any failure; 1: only when none is "
            "located). The good predictions are written either way.",
            min=0.0,
            max=1.0,
        ),
    ] = default(PredictOptions, "max_failure_rate"),
    progress: ProgressOpt = True,
    show: Annotated[
        int, typer.Option(help="Print at most this many rows of the table (0: all).", min=0)
    ] = 50,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print the table.")] = False,
) -> None:
    """Predict where images (or texts) are: top-k locations with their mass, an estimate, nearest places.

    Prints a table (or JSON with --format json); writes CSV/Parquet rows (--out), GeoJSON (--geojson),
    density maps (--maps) and their cells (--density-out). Every output says whether the estimate lies in
    one of the top-k modes ("in mode #1") or outside them, and keeps the text of text queries. Inputs that
    cannot be used (missing or corrupt files, bad manifest rows) get an error row in every output and one
    line on stderr naming the item and the reason; the others go on.

    Exit code: 0 when every item was located, or when some failed but no more than --max-failure-rate of
    them (default 5%); 1 otherwise (also when none was located), after writing every good prediction.

    Example:
        geoloc predict photos/ --checkpoint runs/osv5m-rfm --out predictions.csv --geojson predictions.geojson
        geoloc predict --checkpoint runs/demo --text Springfield --text Paris --maps maps/ --trajectories 8
        geoloc predict --checkpoint runs/demo --text-file places.txt --format json > answers.json
        ls photos/*.jpg | geoloc predict - --checkpoint runs/osv5m-rfm --density-out cells.parquet
        geoloc predict demo-geonames --split test --limit 50 --checkpoint runs/demo --out test.parquet
    """
    # torch, the backbones and the density maps load here, not at import (keeps `geoloc --help` fast)
    from geoloc.export import format_table, write_geojson, write_table
    from geoloc.pipeline.backbones import quiet_loading
    from geoloc.pipeline.predict_job import (
        check_outputs,
        load_predictor,
        read_texts,
        run_predict,
        summarize,
        write_maps,
    )

    check_outputs(out=out, density_out=density_out, geojson=geojson)  # before any work
    texts = read_texts(text or [], text_file or [])
    with quiet_loading(not progress):
        predictor = load_predictor(checkpoint, device=device, backbone=backbone, weights=weights)
    want_maps = (maps is not None or density_out is not None) and max_maps > 0
    options = PredictOptions(
        estimator=estimator.value,
        top_k=top_k,
        samples=samples,
        omega=omega,
        steps=steps,
        localizability=localizability,
        regions=regions,
        region_samples=region_samples,
        batch_size=batch_size,
        seed=seed,
        keep_embeddings=want_maps,
        keep_samples=want_maps,
    )
    results = run_predict(
        predictor,
        list(inputs or []),
        texts,
        options,
        split=split,
        root=root,
        limit=limit,
        max_maps=max_maps if want_maps else 0,
        progress=progress,
    )
    if output_format.value == "json":
        typer.echo(json.dumps([r.to_json() for r in results], ensure_ascii=False, indent=1))
    elif output_format.value == "jsonl":
        for r in results:
            typer.echo(json.dumps(r.to_json(), ensure_ascii=False))
    elif not quiet:
        shown = results if show == 0 else results[:show]
        typer.echo(format_table(shown, top_k=top_k))
        if len(shown) < len(results):
            typer.echo(f"... {len(results) - len(shown)} more row(s); write them all with --out")
    summary = summarize(results, max_failure_rate)
    for line in summary.lines():
        _log(line)
    if out is not None:
        _log(f"wrote {write_table(results, out, top_k=top_k)}")
    if geojson is not None:
        _log(f"wrote {write_geojson(results, geojson)}")
    if want_maps:
        formats = MapOptions(format=map_format.value).formats
        written = write_maps(
            predictor,
            results,
            maps,
            max_maps=max_maps,
            formats=formats,
            steps=map_steps,
            levels=map_levels,
            start_resolution=map_start,
            trajectories=trajectories,
            seed=seed,
            progress=progress,
            density_out=density_out,
        )
        if maps is not None:
            _log(f"wrote {sum(p.parent == maps for p in written)} map(s) to {maps}")
        if density_out is not None:
            _log(f"wrote {density_out}")
    verdict = summary.verdict()
    if verdict is not None:
        _log(f"error: {verdict}")
        raise typer.Exit(1)
