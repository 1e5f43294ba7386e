"""`geoloc train`: train a flow / diffusion / vMF model on cached features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from geoloc.config import config_to_dict
from geoloc.presets import resolve_config

EXAMPLES = """
Examples:

  geoloc train --store stores/osv5m-streetclip --preset osv5m-rfm-s2 --out runs/osv-rfm

  geoloc train --store stores/demo --preset small --val-split test --out runs/demo --steps 2000

  geoloc train --store stores/yfcc:1 --store stores/osv:2 --preset yfcc-rfm-s2 --out runs/combined

  geoloc train --store stores/osv --where "unique_country = 'FR'" --init-from runs/osv-rfm --out runs/fr --steps 5000

  torchrun --nproc-per-node 2 -m geoloc.cli train --store stores/demo --preset small --out runs/ddp
"""  # noqa: E501 (the help's epilog: its example lines stay whole)


def train_command(
    store: Annotated[
        list[str], typer.Option("--store", "-s", help="Feature store DIR, or DIR:WEIGHT to mix (repeatable).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoint directory (resumes a run found there).")
    ],
    preset: Annotated[str, typer.Option(help="Named configuration (see `geoloc.presets`).")] = "small",
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with dotted config keys.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: --set optim.lr=3e-4 (repeatable)."),
    ] = None,
    family: Annotated[
        str | None, typer.Option(help="Family: rfm-s2, flow-r3, diffusion-r3, vmf, vmf-mix.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size.")] = None,
    split: Annotated[str | None, typer.Option(help="Training split (default: train).")] = None,
    val_split: Annotated[
        str | None, typer.Option(help="Held-out split for validation loss and GeoScore.")
    ] = None,
    where: Annotated[
        str | None, typer.Option(help="SQL filter on the store, e.g. \"unique_country <> 'FR'\".")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (bf16 where native), bf16 or fp32.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for initialisation, data order and noise.")] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this checkpoint's weights (fine-tuning).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Resume a run found in --out.")] = True,
) -> None:
    """Train a model on (embedding, location) pairs streamed from feature stores.

    The resolved configuration is printed and saved in OUT/config.json next to model.safetensors (EMA
    weights), model_raw.safetensors, train_state.pt (for resuming) and metrics.jsonl.
    """
    from geoloc.pipeline.train_job import run_train  # torch: not for --help

    overrides = list(set_ or [])
    for key, value in (
        ("steps", steps),
        ("data.batch_size", batch_size),
        ("data.split", split),
        ("data.val_split", val_split),
        ("data.where", where),
        ("device", device),
        ("dtype", dtype),
        ("seed", seed),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    overrides.append("data.stores=" + ",".join(store))
    cfg = resolve_config(preset, config, overrides, family=family)
    typer.echo("config: " + json.dumps(config_to_dict(cfg), default=str))
    result = run_train(cfg, out, init_from=init_from, resume=resume)
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
    typer.echo(f"trained to step {result.step}: {summary}\ncheckpoint: {result.out_dir}")


def register(app: typer.Typer) -> None:
    app.command("train", epilog=EXAMPLES)(train_command)
