"""`geoloc gazetteer` (being written)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the app (placeholder until the command lands)."""
