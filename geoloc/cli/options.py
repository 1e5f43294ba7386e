"""Shared pieces of the Typer commands: defaults and choice lists read from :mod:`geoloc.config`.

A command's option default is ``default(SomeConfig, "field")`` and its choices are
``choice_enum("Name", SomeLiteral)``, so a default or a choice changes in one place (the config dataclass)
and the ``--help`` text follows. Only torch-free modules are imported here (``geoloc --help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import typing
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["DeviceOpt", "ProgressOpt", "choice_enum", "default"]


def default(cls: type, name: str) -> Any:
    """The default value of field ``name`` of the config dataclass ``cls`` (a factory is called)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def choice_enum(name: str, literal: Any) -> type[StrEnum]:
    """A ``StrEnum`` whose values are the ``Literal[...]`` values (Typer shows and checks them)."""
    values = typing.get_args(literal)
    return StrEnum(name, {str(v).replace("-", "_"): str(v) for v in values})


DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar.")]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (reused by a second run).")]
