"""`geoloc distill`: a guidance-distilled copy of a checkpoint (one network pass per guided sampler step)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from geoloc.cli.options import DeviceOpt, ProgressOpt, default
from geoloc.config import DistillConfig

EXAMPLES = """
Examples:

  geoloc distill --checkpoint runs/osv-rfm --out runs/osv-rfm-distilled --steps 2000

  geoloc distill --checkpoint runs/plonk-yfcc --store stores/yfcc --out runs/plonk-yfcc-distilled
"""


def distill_command(
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", "-c", help="Trained checkpoint directory (the teacher).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the distilled checkpoint.")],
    steps: Annotated[int, typer.Option(help="Distillation steps.")] = default(DistillConfig, "steps"),
    omega: Annotated[float, typer.Option(help="Guidance ω the student reproduces in one pass.")] = default(
        DistillConfig, "omega"
    ),
    batch_size: Annotated[int, typer.Option(help="Points per step.")] = default(DistillConfig, "batch_size"),
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine to 0).")] = default(
        DistillConfig, "lr"
    ),
    store: Annotated[
        list[str] | None,
        typer.Option("--store", "-s", help="Feature store(s) to read (default: those it was trained on)."),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split to read (default: its training split).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for noise, levels and trajectories.")] = default(
        DistillConfig, "seed"
    ),
    device: DeviceOpt = default(DistillConfig, "device"),
    force: Annotated[bool, typer.Option(help="Overwrite a checkpoint already in OUT.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Distil a checkpoint's classifier-free-guided field at one ω into a one-pass student.

    Guided sampling then costs one network pass per step instead of two branches. OUT holds the teacher's
    weights unchanged plus student.safetensors: at exactly that ω sampling uses the student; any other ω
    (including 0, which the best-answer estimators use) and every likelihood use the teacher.
    """
    cfg = DistillConfig(omega=omega, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
    from geoloc.pipeline.distill_job import run_distill  # torch: not for --help

    result = run_distill(
        checkpoint,
        out,
        cfg,
        stores=list(store or []),
        split=split,
        force=force,
        progress=progress,
        command=" ".join(["geoloc", *sys.argv[1:]]),
    )
    typer.echo(result.summary())


def register(app: typer.Typer) -> None:
    app.command("distill", epilog=EXAMPLES)(distill_command)
