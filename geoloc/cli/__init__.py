"""The ``geoloc`` command line: a thin Typer layer over the library.

Each command lives in its own module and follows the same four steps: parse options → build a config →
call one library function → print a short summary. ``main()`` is the single error boundary: a
:class:`~geoloc.errors.GeolocError` becomes ``error: <message>`` on stderr and exit code 1 (the traceback
appears only with ``GEOLOC_DEBUG=1``); anything else is a bug and keeps its traceback.
Heavy libraries (torch, transformers, open_clip, ray) are imported inside command bodies so that
``geoloc --help`` stays fast.

Help is rendered as written: rich markup is off (it ate ``FLOAT[dim]`` and ``[default: ~/.cache/geoloc]``),
and indented blocks of a command's help (its examples) keep their lines instead of being rewrapped.
"""

from __future__ import annotations

import errno
import inspect
import os
import re
import sys
from typing import Annotated

import typer

from geoloc import __version__
from geoloc.cli import convert, demo, distill, embed, evaluate, gazetteer, predict, store, train

__all__ = ["app", "keep_blocks", "main"]

app = typer.Typer(
    name="geoloc",
    help="Generative visual geolocation: embed images, train flows on the sphere, evaluate, predict.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"geoloc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Generative visual geolocation: embed images, train flows on the sphere, evaluate, predict."""


def keep_blocks(text: str | None) -> str | None:
    """Mark each paragraph that holds indented lines (an example block) with click's ``\\b`` so that it is
    printed line by line, as written, instead of being rewrapped into one paragraph."""
    if not text:
        return text
    paragraphs = re.split(r"\n[ \t]*\n", inspect.cleandoc(text))
    return "\n\n".join(
        "\b\n" + par if any(line[:1] in (" ", "\t") for line in par.splitlines()) else par
        for par in paragraphs
    )


def _keep_blocks_everywhere(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        info.help = keep_blocks(info.help or inspect.getdoc(info.callback))
        info.epilog = keep_blocks(info.epilog)
    for group in typer_app.registered_groups:
        _keep_blocks_everywhere(group.typer_instance)


for _module in (embed, store, train, distill, evaluate, predict, gazetteer, convert, demo):
    _module.register(app)
_keep_blocks_everywhere(app)


def main() -> None:
    """Console-script entry point with the error boundary."""
    from geoloc.errors import GeolocError

    try:
        app()
    except GeolocError as e:
        if os.environ.get("GEOLOC_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        # Disk full: one line, not a 60-line traceback (every write is atomic, so the data stays consistent).
        if e.errno != errno.ENOSPC or os.environ.get("GEOLOC_DEBUG") == "1":
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"error: no space left on device{where}; free some space and run the command again (what was "
            "already committed is intact)",
            file=sys.stderr,
        )
        sys.exit(1)
