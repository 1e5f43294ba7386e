"""`geoloc store`: inspect, query, verify a feature store, and import existing embeddings into one.

Every subcommand opens the store through :mod:`geoloc.pipeline.store` and prints; the import is one call to
:func:`geoloc.pipeline.importers.import_embeddings`. DuckDB and pyarrow are imported inside the commands so
``geoloc --help`` stays fast.
"""

from __future__ import annotations

import csv
import io
import json
import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from geoloc.cli.options import ProgressOpt, choice_enum, default
from geoloc.config import ImportConfig, SourceKind

store_app = typer.Typer(
    name="store",
    help="Inspect, query, verify feature stores and import existing embeddings into them.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

StoreArg = Annotated[
    Path, typer.Argument(help="Feature store directory (holds store.json).", show_default=False)
]


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def register(app: typer.Typer) -> None:
    """Add the `geoloc store` command group."""
    app.add_typer(store_app, name="store")


# ------------------------------------------------------------------------------------------- output
def _cell(v: Any, width: int = 48) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_cell(x, 12) for x in v[:6])
        s = f"[{inner}{', …' if len(v) > 6 else ''}] ({len(v)})" if len(v) > 6 else f"[{inner}]"
    else:
        s = str(v)
    return s if len(s) <= width else s[: width - 1] + "…"


def format_rows(columns: list[str], rows: list[tuple], fmt: OutputFormat | str) -> str:
    """Render a result set as an aligned text table, CSV, or a JSON array of objects."""
    fmt = OutputFormat(fmt)
    if fmt is OutputFormat.json:

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return json.dumps([{c: clean(v) for c, v in zip(columns, r, strict=True)} for r in rows], default=str)
    if fmt is OutputFormat.csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if v is None else json.dumps(v) if isinstance(v, (list, tuple)) else v for v in r])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- commands
@store_app.command("info")
def info(store: StoreArg) -> None:
    """Show a store's backbone, dimension, rows per split, shards, failures and label columns.

    Example:
        geoloc store info features/osv5m-streetclip
    """
    from geoloc.pipeline.store import FeatureStore

    s = FeatureStore.open(store)
    bb = s.backbone
    size = sum(p.stat().st_size for p in s.shard_paths() if p.exists())
    typer.echo(f"store      {s.root}")
    typer.echo(f"backbone   {bb.name} (revision {bb.revision or '-'}), dim {s.dim}")
    if bb.preprocessing:
        typer.echo(f"preproc    {json.dumps(bb.preprocessing, sort_keys=True)}")
    splits = ", ".join(f"{k} {v:,}" for k, v in s.rows_per_split().items()) or "-"
    typer.echo(f"rows       {s.num_rows():,} ({splits})")
    typer.echo(f"shards     {len(s.shard_records)} ({size / 2**20:,.1f} MiB)")
    typer.echo(f"failures   {s.num_failures():,} (see `geoloc store failures {store}`)")
    typer.echo(f"labels     {', '.join(s.label_columns) or '-'}")
    for src in s.sources:
        typer.echo(f"source     {src.get('name')} [{src.get('kind')}] added {src.get('added', '?')}")
    typer.echo(f"updated    {s.manifest.get('updated', '?')}")


@store_app.command("sql")
def sql(
    store: StoreArg,
    query: Annotated[str, typer.Argument(help="SQL over the views `features` and `failures`.")],
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
    limit: Annotated[int, typer.Option(help="Print at most this many rows (0 = all).", min=0)] = 0,
) -> None:
    """Run a DuckDB query over the store (views `features` and `failures`) and print the result.

    `emb` is FLOAT[dim]; lists are abbreviated in the table format.

    Example:
        geoloc store sql features/demo "SELECT split, count(*) AS n FROM features GROUP BY split"
        geoloc store sql features/demo "SELECT id, lat, lon FROM features LIMIT 5" --format csv
    """
    import duckdb

    from geoloc.errors import InputError
    from geoloc.pipeline.store import FeatureStore

    con = FeatureStore.open(store).connect()
    try:
        rel = con.sql(query)
        if rel is None:
            typer.echo("OK")
            return
        columns = list(rel.columns)
        rows = (rel.limit(limit) if limit else rel).fetchall()
    except duckdb.Error as e:
        raise InputError(f"SQL failed: {str(e).splitlines()[0]}") from e
    typer.echo(format_rows(columns, rows, fmt))


@store_app.command("verify")
def verify(
    store: StoreArg,
    checksums: Annotated[bool, typer.Option(help="Recompute every file's sha256 (slower).")] = True,
) -> None:
    """Check every listed shard (checksum, rows, schema, coordinates), duplicate ids and orphan files.

    Exits 1 when a problem is found.

    Example:
        geoloc store verify features/demo
    """
    from geoloc.pipeline.store import FeatureStore

    report = FeatureStore.open(store).verify(checksums=checksums)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@store_app.command("repair")
def repair(
    store: StoreArg,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for a running writer.", min=0.0)
    ] = 0.0,
) -> None:
    """Remove duplicate ids (keeping the first copy); affected shards are rewritten atomically.

    Example:
        geoloc store repair features/demo
    """
    from geoloc.pipeline.store import repair_store

    removed, rewritten = repair_store(store, wait_s=wait)
    typer.echo(f"{store}: removed {removed} duplicate row(s), rewrote {rewritten} shard(s)")


@store_app.command("failures")
def failures(
    store: StoreArg,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
    limit: Annotated[int, typer.Option(help="Print at most this many rows (0 = all).", min=0)] = 0,
) -> None:
    """List the failures table: items that could not be embedded or imported, with the reason.

    Example:
        geoloc store failures features/demo --format csv > failures.csv
    """
    from geoloc.pipeline.store import FeatureStore

    table = FeatureStore.open(store).failures_table()
    if limit:
        table = table.slice(0, limit)
    rows = [tuple(r.values()) for r in table.to_pylist()]
    typer.echo(format_rows(table.column_names, rows, fmt))


SourceKindOpt = choice_enum("SourceKindOpt", SourceKind)


@store_app.command("import")
def import_(
    source: Annotated[
        str, typer.Argument(help="A .tar/.parquet/.npy file, a directory, or a glob (quote it).")
    ],
    store: Annotated[Path, typer.Option("--store", help="Feature store directory (created if missing).")],
    backbone: Annotated[str, typer.Option(help="Backbone that produced the embeddings (recorded/checked).")],
    split: Annotated[
        str | None,
        typer.Option(help="Split for every row (default: the source's `split` column, else train)."),
    ] = default(ImportConfig, "split"),
    kind: Annotated[
        SourceKindOpt, typer.Option(help="Source kind (auto: by file extension).")
    ] = SourceKindOpt(default(ImportConfig, "kind")),
    id_col: Annotated[str | None, typer.Option(help="Id column / JSON key (auto: id, __key__, key).")] = None,
    lat_col: Annotated[
        str | None, typer.Option(help="Latitude column / JSON key (auto: lat, latitude).")
    ] = None,
    lon_col: Annotated[
        str | None, typer.Option(help="Longitude column / JSON key (auto: lon, lng, longitude).")
    ] = None,
    emb_col: Annotated[
        str | None,
        typer.Option(
            help="Parquet embedding column, or a glob like 'emb_*' for one "
            "column per dimension (auto: emb, embedding)."
        ),
    ] = None,
    emb_key: Annotated[str, typer.Option(help="Webdataset member holding the embedding.")] = default(
        ImportConfig, "emb_key"
    ),
    metadata: Annotated[
        Path | None,
        typer.Option(help="CSV/Parquet paired with an .npy source (default: same stem next to it)."),
    ] = None,
    labels: Annotated[
        str, typer.Option(help="Extra label columns to keep, comma-separated (unique_* are always kept).")
    ] = "",
    revision: Annotated[str, typer.Option(help="Backbone revision to record.")] = default(
        ImportConfig, "revision"
    ),
    max_failure_rate: Annotated[
        float, typer.Option(help="Exit 1 if more than this fraction of rows fail.", min=0.0, max=1.0)
    ] = default(ImportConfig, "max_failure_rate"),
    chunk_rows: Annotated[
        int, typer.Option(help="Rows per processing chunk (bounds memory).", min=1)
    ] = default(ImportConfig, "chunk_rows"),
    progress: ProgressOpt = default(ImportConfig, "progress"),
    wait: Annotated[
        float,
        typer.Option(
            "--wait", help="Seconds to wait when another writer holds the store (0 = exit at once).", min=0.0
        ),
    ] = default(ImportConfig, "wait_s"),
) -> None:
    """Import precomputed embeddings (webdataset tars, Parquet, or .npy + metadata) into a feature store.

    Only ids not yet in the store are added; bad rows go to the failures table with a reason.

    Example:
        geoloc store import 'osv5m-wds/train/*.tar' --store features/osv5m --backbone streetclip --split train
        geoloc store import feats.parquet --store features/mine --backbone vit-b-32 --emb-col 'emb_*'
        geoloc store import emb.npy --metadata meta.csv --store features/mine --backbone vit-b-32
    """
    from geoloc.pipeline.importers import import_embeddings  # pyarrow and numpy: not for --help

    cfg = ImportConfig(
        source=source,
        store=store,
        backbone=backbone,
        revision=revision,
        split=split,
        kind=kind.value,
        id_col=id_col,
        lat_col=lat_col,
        lon_col=lon_col,
        emb_col=emb_col,
        emb_key=emb_key,
        metadata=metadata,
        labels=tuple(x.strip() for x in labels.split(",") if x.strip()),
        chunk_rows=chunk_rows,
        max_failure_rate=max_failure_rate,
        progress=progress,
        wait_s=wait,
    )
    report = import_embeddings(cfg)
    typer.echo(report.summary())
    if not report.ok:
        typer.echo(
            f"error: {report.failure_rate:.2%} of rows failed (limit {max_failure_rate:.2%}); "
            f"see `geoloc store failures {store}`",
            err=True,
        )
        raise typer.Exit(1)
