"""``progress_bar``: the one home for progress reporting.

One set-up for every long loop (embed, import, train, eval, predict, maps): a tqdm bar on stderr, so that
stdout stays clean for JSON and tables, that sizes itself to the terminal, shows a rate and an ETA, and is
silenced by ``enabled=False`` (``--no-progress``) without changing the loop.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(
    total: int | float | None,
    desc: str,
    *,
    unit: str = "item",
    enabled: bool = True,
    initial: int = 0,
    leave: bool = True,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on stderr; ``total=None`` (or 0) shows a counter without a percentage."""
    return tqdm(
        total=total or None,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=leave,
        **kwargs,
    )
