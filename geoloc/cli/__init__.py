"""The ``geoloc`` command line: a thin Typer layer over the library.

Each command lives in its own module and follows the same four steps: parse options → build a config →
call one library function → print a short summary. ``main()`` is the single error boundary: a
:class:`~geoloc.errors.GeolocError` becomes ``error: <message>`` on stderr and exit code 1 (the traceback
appears only with ``GEOLOC_DEBUG=1``); anything else is a bug and keeps its traceback.
Heavy libraries (torch, transformers, open_clip, ray) are imported inside command bodies so that
``geoloc --help`` stays fast.
"""

from __future__ import annotations

import errno
import os
import sys

import typer

from geoloc.cli import convert, demo, embed, evaluate, gazetteer, predict, store, train

__all__ = ["app", "main"]

app = typer.Typer(
    name="geoloc",
    help="Generative visual geolocation: embed images, train flows on the sphere, evaluate, predict.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

for _module in (embed, store, train, evaluate, predict, gazetteer, convert, demo):
    _module.register(app)


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
        print(f"error: no space left on device{where}; free some space and run the command again (what was "
              "already committed is intact)", file=sys.stderr)
        sys.exit(1)
