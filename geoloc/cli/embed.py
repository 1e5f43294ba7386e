"""`geoloc embed`: turn a dataset manifest into cached backbone features in a feature store.

Thin by design: options → :class:`~geoloc.pipeline.embed.EmbedConfig` →
:func:`~geoloc.pipeline.embed.run_embed` → summary. torch, transformers and open_clip are imported inside
the command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoloc.cli.options import DeviceOpt, ProgressOpt, choice_enum, default
from geoloc.config import EmbedConfig, EmbedDtype, EngineName

DtypeOpt = choice_enum("DtypeOpt", EmbedDtype)
EngineOpt = choice_enum("EngineOpt", EngineName)


def register(app: typer.Typer) -> None:
    """Add `geoloc embed`."""
    app.command("embed")(embed)


def embed(
    manifest: Annotated[
        str,
        typer.Argument(
            help="Dataset manifest: a .toml path or a shipped name (e.g. demo-geonames, osv5m).",
            show_default=False,
        ),
    ],
    store: Annotated[
        Path,
        typer.Option(
            "--store", help="Feature store directory (created, or grown if it exists).", show_default=False
        ),
    ],
    root: Annotated[Path | None, typer.Option(help="Dataset root (overrides the manifest's `root`).")] = None,
    split: Annotated[
        list[str] | None, typer.Option("--split", help="Split to embed; repeat for several (default: all).")
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            help="streetclip, dinov2-l-reg, minilm, tiny-random or "
            "open_clip:ARCH/TAG (default: the store's, else minilm for "
            "text and dinov2-l-reg for images)."
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="Local weights (file or folder) instead of the offline Hugging Face cache."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Items per model batch.", min=1)] = default(
        EmbedConfig, "batch_size"
    ),
    num_workers: Annotated[
        int | None,
        typer.Option(
            help="Decode worker processes (default: min(4, CPUs) for images, 0 for text = in-process).",
            min=0,
        ),
    ] = default(EmbedConfig, "num_workers"),
    device: DeviceOpt = default(EmbedConfig, "device"),
    dtype: Annotated[DtypeOpt, typer.Option(help="auto: bf16 where the device supports it.")] = DtypeOpt(
        default(EmbedConfig, "dtype")
    ),
    shard_size: Annotated[int, typer.Option(help="Rows per shard file.", min=1)] = default(
        EmbedConfig, "shard_size"
    ),
    flush_minutes: Annotated[
        float,
        typer.Option(help="Also write a shard after this many minutes, so a kill loses little.", min=0.01),
    ] = default(EmbedConfig, "flush_interval_s") / 60.0,
    limit: Annotated[
        int | None, typer.Option(help="Embed a deterministic subsample of N dataset rows.", min=1)
    ] = default(EmbedConfig, "limit"),
    engine: Annotated[EngineOpt, typer.Option(help="local, or ray (needs the `ray` extra).")] = EngineOpt(
        default(EmbedConfig, "engine")
    ),
    replicas: Annotated[
        int | None, typer.Option(help="Ray: model replicas (default: one per GPU).", min=1)
    ] = default(EmbedConfig, "replicas"),
    max_failure_rate: Annotated[
        float, typer.Option(help="Exit 1 if more than this fraction of items fail.", min=0.0, max=1.0)
    ] = default(EmbedConfig, "max_failure_rate"),
    progress: ProgressOpt = default(EmbedConfig, "progress"),
    wait: Annotated[
        float,
        typer.Option(
            "--wait", help="Seconds to wait when another writer holds the store (0 = exit at once).", min=0.0
        ),
    ] = default(EmbedConfig, "wait_s"),
) -> None:
    """Embed a dataset with a frozen backbone into a feature store (incremental and resumable).

    Only ids not yet in the store are embedded, so re-running after a crash or on a grown dataset does just
    the missing work. Bad items (missing, truncated or corrupt files, invalid coordinates) are recorded in
    the store's failures table and skipped.

    Example:
        geoloc embed demo-geonames --store features/demo --limit 20000
        geoloc embed data_manifests/osv5m.toml --root /data/osv5m --split test --backbone streetclip --store features/osv5m
        geoloc embed my-photos.toml --store features/mine --backbone open_clip:ViT-B-32/openai --weights vitb32.safetensors
    """  # noqa: E501 (typer prints this docstring as the help: its example lines stay whole)
    from geoloc.pipeline.embed import run_embed  # torch, transformers, open_clip: not for --help

    config = EmbedConfig(
        manifest=manifest,
        store=store,
        root=root,
        splits=tuple(split) if split else None,
        backbone=backbone,
        weights=weights,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        dtype=dtype.value,
        shard_size=shard_size,
        flush_interval_s=flush_minutes * 60.0,
        limit=limit,
        engine=engine.value,
        max_failure_rate=max_failure_rate,
        progress=progress,
        replicas=replicas,
        wait_s=wait,
    )
    report = run_embed(config)
    typer.echo(report.summary())
    if not report.ok:
        typer.echo(
            f"error: {report.failure_rate:.2%} of items failed (limit {max_failure_rate:.2%}); "
            f"see `geoloc store failures {store}`",
            err=True,
        )
        raise typer.Exit(1)
