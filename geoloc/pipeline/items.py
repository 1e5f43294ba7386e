"""The two records that flow through every batch job: an :class:`Item` to embed, or a :class:`Failure`.

Readers yield both; the embed job turns items into feature rows and failures into rows of the store's
failures table. Keeping them as plain dataclasses lets readers, backbones and the store be written and
tested separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Failure", "Item"]


@dataclass
class Item:
    """One thing to embed.

    Attributes:
        id: unique id within the dataset (string; numeric ids are stringified).
        split: dataset split ("train", "test", ...).
        lat, lon: degrees (validated by the reader; NaN rows become failures, never items).
        payload: encoded image bytes (``kind="image"``) or a text string (``kind="text"``).
        source: where it came from, for error messages (``path``, ``archive.zip:member``,
            ``file.csv:row 12``).
        labels: extra string columns kept in the store (e.g. ``unique_country``); ``None`` = missing.
    """

    id: str
    split: str
    lat: float
    lon: float
    payload: bytes | str
    source: str
    kind: Literal["image", "text"] = "image"
    labels: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """An item that could not be used, with a one-line reason that says what to do."""

    id: str
    source: str
    reason: str
    split: str = ""
