"""SQL text for DuckDB over Parquet shards: the one home for quoting, file lists, filters and connections.

Why one module: the store's views, the loader's selection and the evaluation pass all build DuckDB queries
from user input (paths, split names, ``--where``); quoting them in one place keeps them quoted the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb

__all__ = ["connect", "files_sql", "first_line", "quote_ident", "sql_str", "where_sql"]


def sql_str(s: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + s.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """A SQL identifier (double quotes doubled), for column names that are not plain words."""
    return '"' + name.replace('"', '""') + '"'


def files_sql(paths: Sequence[Path]) -> str:
    """``['a.parquet', 'b.parquet']``: a DuckDB list of file paths for ``read_parquet``."""
    return "[" + ", ".join(sql_str(str(p)) for p in paths) + "]"


def where_sql(split: str | None, where: str | None, extra: str | None = None) -> str:
    """`` WHERE split = '...' AND (where) AND (extra)``, or ``""`` when there is no condition."""
    conds = []
    if split is not None:
        conds.append(f"split = {sql_str(split)}")
    if where:
        conds.append(f"({where})")
    if extra:
        conds.append(f"({extra})")
    return (" WHERE " + " AND ".join(conds)) if conds else ""


def first_line(e: BaseException) -> str:
    """The first line of an error message (DuckDB's run to several), or the error's type name."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection whose scan order does not depend on thread timing."""
    con = duckdb.connect(":memory:")
    # The data order must not depend on thread timing: keep DuckDB's scan order (the default, made explicit).
    con.execute("SET preserve_insertion_order = true")
    return con
