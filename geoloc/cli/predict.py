"""`geoloc predict`: where are these images (or place names)? A table, CSV/Parquet, GeoJSON and density maps.

Thin by design: options → :class:`~geoloc.predict.PredictOptions` → :class:`~geoloc.predict.Predictor` →
:mod:`geoloc.export` / :mod:`geoloc.density` → summary. torch and the backbones load inside the command.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class MapFormat(StrEnum):
    png = "png"
    html = "html"
    both = "both"


def register(app: typer.Typer) -> None:
    """Add `geoloc predict`."""
    app.command("predict")(predict)


def _records(inputs: list[str], texts: list[str], takes_text: bool, split: list[str] | None, root: Path | None,
             limit: int | None) -> tuple[list, int | None]:
    """Positional inputs and --text → records (files, folders, or manifests by name or .toml path)."""
    import itertools

    from geoloc.errors import InputError
    from geoloc.pipeline.manifests import load_manifest
    from geoloc.pipeline.readers import iter_items
    from geoloc.predict import IMAGE_SUFFIXES, collect_inputs

    records: list = []
    for x in inputs:
        p = Path(x)
        if p.suffix == ".toml" or not (p.exists() or p.suffix.lower() in IMAGE_SUFFIXES):
            manifest = load_manifest(x, root=root)
            records.append(iter_items(manifest, splits=split))
        else:
            records.append(collect_inputs([p], text=False))
    if texts:
        if not takes_text:
            raise InputError("--text needs a checkpoint trained on a text backbone (e.g. minilm); this one "
                             "embeds images: pass image files or folders instead")
        records.append(collect_inputs(texts, text=True))
    if not records:
        raise InputError("nothing to predict: pass image files, folders, a manifest, or --text")
    stream = itertools.chain.from_iterable(records)
    sized = all(isinstance(r, list) for r in records)
    total = sum(len(r) for r in records) if sized else None
    if limit is not None:
        stream = itertools.islice(stream, limit)
        total = limit if total is None else min(total, limit)
    return list(stream) if sized or limit is not None else stream, total


def predict(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="Checkpoint directory (geoloc train "
                                             "or geoloc convert plonk).", show_default=False)],
    inputs: Annotated[list[str] | None, typer.Argument(help="Image files, folders of images, or dataset "
                                                            "manifests (a .toml path or a shipped name).",
                                                       show_default=False)] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="A text to locate (text backbones such as "
                                                   "minilm); repeat for several.")] = None,
    estimator: Annotated[str, typer.Option(help="Point estimate: sample (one guided draw, the paper), median, "
                                                "geoscore, mode, mean, best-of-n.")] = "sample",
    top_k: Annotated[int, typer.Option(help="Distinct locations to report per item, with their mass.",
                                       min=0)] = 3,
    samples: Annotated[int, typer.Option(help="Model draws behind the top-k and sample-based estimators.",
                                         min=1)] = 256,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (default: the checkpoint's, 250 as in the "
                                                   "paper; 32-64 is much faster on a CPU).", min=1)] = None,
    omega: Annotated[float | None, typer.Option(help="Guidance weight for the estimate (default: 2 for "
                                                     "sample, 0 otherwise).")] = None,
    localizability: Annotated[bool, typer.Option(help="Also estimate localizability (bits; an exact-likelihood "
                                                      "ODE per sample, slow).")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write rows to a .csv or .parquet file.")] = None,
    geojson: Annotated[Path | None, typer.Option(help="Write a GeoJSON FeatureCollection.")] = None,
    maps: Annotated[Path | None, typer.Option(help="Write a density map per item into this folder.")] = None,
    max_maps: Annotated[int, typer.Option(help="At most this many maps (each costs an adaptive "
                                               "likelihood grid).", min=0)] = 10,
    map_format: Annotated[MapFormat, typer.Option(help="png, html (self-contained SVG) or both.")] = MapFormat.png,
    map_steps: Annotated[int, typer.Option(help="RK4 steps of the likelihood ODE for maps (the map's title "
                                                "shows its total mass as a check).", min=1)] = 16,
    map_start: Annotated[int, typer.Option(help="H3 resolution of the first, global grid (0: 122 cells, "
                                                "cheaper; 1: 842).", min=0, max=4)] = 1,
    map_levels: Annotated[int, typer.Option(help="Refinement levels of the H3 grid (finest resolution = "
                                                 "start + levels).", min=0, max=10)] = 5,
    trajectories: Annotated[int, typer.Option(help="Overlay the denoising paths of this many samples on the "
                                                   "maps (flow families).", min=0)] = 0,
    split: Annotated[list[str] | None, typer.Option("--split", help="Manifest split(s) to read "
                                                    "(default: all).")] = None,
    root: Annotated[Path | None, typer.Option(help="Dataset root (overrides the manifest's).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items.", min=1)] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone name (default: the one config.json "
                                                      "records).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local backbone weights instead of the offline Hugging "
                                                      "Face cache.")] = None,
    batch_size: Annotated[int, typer.Option(help="Inputs per backbone batch.", min=1)] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the model's draws (reproducible output).")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    show: Annotated[int, typer.Option(help="Print at most this many rows of the table (0: all).", min=0)] = 50,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print the table.")] = False,
) -> None:
    """Predict where images (or texts) are: top-k locations with their mass, an estimate, nearest places.

    Prints a table; writes CSV/Parquet rows (--out), GeoJSON (--geojson) and density maps (--maps). Inputs
    that cannot be used (missing or corrupt files) get an error row; the others go on.

    Example:
        geoloc predict photos/ --checkpoint runs/osv5m-rfm --out predictions.csv --geojson predictions.geojson
        geoloc predict --checkpoint runs/demo --text Springfield --text Paris --maps maps/ --trajectories 8
        geoloc predict demo-geonames --split test --limit 50 --checkpoint runs/demo --out test.parquet
    """
    from geoloc.errors import InputError
    from geoloc.predict import PredictOptions, Predictor

    if not (checkpoint / "config.json").is_file():
        raise InputError(f"{checkpoint}: not a checkpoint directory (no config.json); pass --checkpoint DIR")
    predictor = Predictor.from_pretrained(checkpoint, device=device, backbone=backbone, weights=weights)
    records, total = _records(list(inputs or []), list(text or []), predictor.takes_text, split, root, limit)
    options = PredictOptions(estimator=estimator, top_k=top_k, samples=samples, omega=omega, steps=steps,
                             localizability=localizability, batch_size=batch_size, seed=seed,
                             keep_embeddings=maps is not None, keep_samples=maps is not None)
    results = []
    kept = 0
    for r in predictor.predict_items(records, options, progress=progress, total=total):
        if r.ok and r.embedding is not None and kept < max_maps:
            kept += 1
        else:  # only the mapped items need their embedding and samples in memory
            r.embedding = r.samples = None
        results.append(r)
    from geoloc.export import format_table, write_geojson, write_table

    if not quiet:
        shown = results if show == 0 else results[:show]
        typer.echo(format_table(shown, top_k=top_k))
        if len(shown) < len(results):
            typer.echo(f"... {len(results) - len(shown)} more row(s); write them all with --out")
    n_bad = sum(not r.ok for r in results)
    typer.echo(f"{len(results)} item(s), {len(results) - n_bad} located, {n_bad} failed")
    if out is not None:
        typer.echo(f"wrote {write_table(results, out, top_k=top_k)}")
    if geojson is not None:
        typer.echo(f"wrote {write_geojson(results, geojson)}")
    if maps is not None and max_maps > 0:
        from geoloc.predict import write_maps

        written = write_maps(predictor, results, maps, max_maps=max_maps,
                             formats=("png", "html") if map_format == MapFormat.both else (map_format.value,),
                             steps=map_steps, levels=map_levels, start_resolution=map_start,
                             trajectories=trajectories, seed=seed,
                             progress=progress)
        typer.echo(f"wrote {len(written)} map(s) to {maps}")
    if results and n_bad == len(results):
        raise typer.Exit(1)
