"""`geoloc convert plonk`: a published PLONK checkpoint → a geoloc checkpoint (see :mod:`geoloc.convert`)."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Annotated

import typer

from geoloc.cli.options import choice_enum
from geoloc.config import PlonkFamily as PlonkFamilyChoice
from geoloc.config import PlonkWeights

convert_app = typer.Typer(
    help="Convert checkpoints from other code bases into geoloc checkpoints.", no_args_is_help=True
)


PlonkFamily = choice_enum("PlonkFamily", PlonkFamilyChoice)
Weights = choice_enum("Weights", PlonkWeights)


def register(app: typer.Typer) -> None:
    """Add `geoloc convert plonk`."""
    app.add_typer(convert_app, name="convert")


@convert_app.command("plonk")
def plonk(
    src: Annotated[
        Path,
        typer.Argument(
            help="A downloaded PLONK hub folder (model.safetensors + config.json), "
            "its model.safetensors, or a Lightning .ckpt.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Output checkpoint directory.", show_default=False)],
    family: Annotated[
        PlonkFamily | None,
        typer.Option(
            help="Default from the name: PLONK_X → rfm-s2, "
            "PLONK_X_flow → flow-r3, PLONK_X_diffusion → "
            "diffusion-r3."
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            help="streetclip or dinov2-l-reg; default from the dataset "
            "in the name (OSV-5M → streetclip, YFCC / iNat21 → "
            "dinov2-l-reg)."
        ),
    ] = None,
    weights: Annotated[
        Weights, typer.Option(help="For a Lightning .ckpt: ema (the published weights) or raw.")
    ] = Weights(typing.get_args(PlonkWeights)[0]),
    force: Annotated[bool, typer.Option(help="Overwrite an existing checkpoint in OUT.")] = False,
) -> None:
    """Convert a published PLONK checkpoint (Hugging Face hub layout) into a geoloc checkpoint.

    The network's parameter names and time convention are the reference's, so the weights are copied
    unchanged and checked; the family, schedule (sigmoid −7/3/1) and backbone are recorded in config.json.

    Example:
        huggingface-cli download nicolas-dufour/PLONK_YFCC --local-dir hub/PLONK_YFCC
        geoloc convert plonk hub/PLONK_YFCC runs/plonk-yfcc
        geoloc convert plonk hub/PLONK_OSV_5M_diffusion runs/plonk-osv-diff
        geoloc predict photos/ --checkpoint runs/plonk-yfcc
    """
    from geoloc.convert import convert_plonk

    result = convert_plonk(
        src,
        out,
        family=None if family is None else family.value,
        backbone=backbone,
        weights=weights.value,
        force=force,
        command=" ".join(["geoloc", *sys.argv[1:]]),
    )
    typer.echo(result.summary())
