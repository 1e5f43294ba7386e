"""Which rows a job reads: stores opened and checked, ``--split`` / ``--where`` applied, rows counted per
shard.

Training (:mod:`geoloc.pipeline.loader`) and evaluation (:mod:`geoloc.pipeline.eval_batches`) select rows the
same way, so this is done once here: every store is opened, checked to hold the same backbone and dimension
(and the one the model expects), and each listed shard's selected rows are counted with one DuckDB query per
store. The per-chunk checks that both readers apply (no missing embedding, coordinates in range, the shard
unchanged since it was counted) live here too, so their error messages are worded once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from geoloc.errors import ConfigError, StoreError
from geoloc.pipeline.sql import connect, files_sql, first_line, where_sql
from geoloc.pipeline.store import FeatureStore

__all__ = [
    "READ_ROWS",
    "Selection",
    "Shard",
    "StoreSpec",
    "batch_arrays",
    "check_coordinates",
    "query_error",
    "select_stores",
    "shard_changed",
]

READ_ROWS = 8192  # rows per Arrow record batch requested from DuckDB


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class StoreSpec:
    """One store to read and its weight: the expected number of passes over it per epoch.

    ``weight=2.0`` reads every selected row twice per epoch (the reference's combined setup lists OSV-5M and
    iNat21 twice, docs/reference-behaviour.md §2.5); ``0.5`` reads a seeded random half of it, a different
    half each epoch.
    """

    path: Path
    weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        w = float(self.weight)
        if not math.isfinite(w) or w <= 0:
            raise ConfigError(f"store {self.path}: weight must be a positive number, got {self.weight!r}")
        object.__setattr__(self, "weight", w)

    @classmethod
    def parse(cls, s: str | Path | StoreSpec) -> StoreSpec:
        """``"PATH"`` or ``"PATH:WEIGHT"`` (as on the command line) → StoreSpec.

        Only a suffix after the last ``:`` that parses as a number is a weight, so paths with colons work.
        """
        if isinstance(s, StoreSpec):
            return s
        if isinstance(s, Path):
            return cls(s)
        text = str(s)
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                return cls(Path(text))
            return cls(Path(head), weight)
        return cls(Path(text))

    def __str__(self) -> str:
        return f"{self.path}:{self.weight:g}" if self.weight != 1.0 else str(self.path)


@dataclass(frozen=True)
class Shard:
    """One listed shard with rows selected, as the loader and the evaluation pass read it."""

    index: int  # position in the loader's global shard list (store order, then manifest order)
    store: int  # index into the loader's stores
    path: Path
    file: str  # path relative to the store root, as listed in store.json
    sha256: str
    rows: int  # rows after the split and where filters
    weight: float


@dataclass
class Selection:
    """Stores opened and checked, and the selected row count of every shard."""

    specs: tuple[StoreSpec, ...]
    stores: tuple[FeatureStore, ...]
    shards: tuple[Shard, ...]
    rows_per_store: tuple[int, ...]
    split: str | None
    where: str | None

    @property
    def dim(self) -> int:
        return self.stores[0].dim

    @property
    def backbone_name(self) -> str:
        return self.stores[0].backbone.name


# ---------------------------------------------------------------------------------------------- selection
def select_stores(
    stores: Sequence[str | Path | StoreSpec | FeatureStore],
    split: str | None,
    where: str | None,
    expected_dim: int | None,
    expected_backbone: str | None,
) -> Selection:
    """Open every store, check they agree (and match the model), count the selected rows of every shard."""
    # An already opened FeatureStore is used as is (the eval job opens each store once and reads it twice).
    specs = tuple(StoreSpec(s.root) if isinstance(s, FeatureStore) else StoreSpec.parse(s) for s in stores)
    if not specs:
        raise ConfigError("no feature store given; pass at least one --store PATH[:WEIGHT]")
    where = where.strip() if where and where.strip() else None
    opened = tuple(
        s if isinstance(s, FeatureStore) else FeatureStore.open(p.path)
        for s, p in zip(stores, specs, strict=True)
    )
    first = opened[0]
    for spec, st in zip(specs[1:], opened[1:], strict=True):
        if (st.backbone.name, st.dim) != (first.backbone.name, first.dim):
            raise StoreError(
                f"{spec.path} holds {st.backbone.name!r} {st.dim}-d embeddings but {specs[0].path} holds "
                f"{first.backbone.name!r} {first.dim}-d; "
                "only stores embedded with the same backbone can be mixed"
            )
    if (expected_dim is not None and int(expected_dim) != first.dim) or (
        expected_backbone is not None and expected_backbone != first.backbone.name
    ):
        want = " ".join(
            x
            for x in (
                repr(expected_backbone) if expected_backbone is not None else "",
                f"{expected_dim}-d" if expected_dim is not None else "",
            )
            if x
        )
        raise StoreError(
            f"{specs[0].path} holds {first.backbone.name!r} {first.dim}-d embeddings but the model expects "
            f"{want} embeddings; use a store embedded with the model's backbone, or train a new model on it"
        )
    con = connect()
    shards: list[Shard] = []
    per_store: list[int] = []
    for si, (spec, st) in enumerate(zip(specs, opened, strict=True)):
        # Only the shards listed in store.json (never a glob: unlisted files are orphans of killed jobs).
        by_path = {st.root / r["file"]: r for r in st.shard_records}
        listed = st.shard_paths(split)
        records = [by_path[p] for p in listed]
        paths = [p.resolve() for p in listed]
        st.check_shards(listed)  # a changed or corrupted shard stops here, before a single row is read
        counts: dict[str, int] = {}
        if paths:
            q = (
                f"SELECT filename, count(*) FROM read_parquet({files_sql(paths)}, filename = true)"
                f"{where_sql(split, where)} GROUP BY filename"
            )
            try:
                counts = {str(f): int(n) for f, n in con.sql(q).fetchall()}
            except Exception as e:  # duckdb.Error: a bad --where, or an unreadable shard
                raise query_error(e, spec.path, where) from e
        total = 0
        for r, p in zip(records, paths, strict=True):
            n = counts.get(str(p), 0)
            if n:
                shards.append(
                    Shard(len(shards), si, p, str(r["file"]), str(r.get("sha256", "")), n, spec.weight)
                )
                total += n
        if total == 0:
            have = st.rows_per_split()
            raise StoreError(
                f"{spec.path}: no rows selected (split={split!r}"
                + (f", where {where!r}" if where else "")
                + f"; the store has {have or 'no rows'}); check --split/--where or embed data into the store"
            )
        per_store.append(total)
    con.close()
    return Selection(specs, opened, tuple(shards), tuple(per_store), split, where)


def query_error(e: Exception, store: Path, where: str | None) -> Exception:
    if where and isinstance(e, duckdb.Error) and not isinstance(e, duckdb.IOException):
        return ConfigError(f"--where {where!r} does not work on store {store}: {first_line(e)}")
    return StoreError(
        f"{store}: reading the shards failed: {first_line(e)}; run `geoloc store verify {store}`"
    )


def shard_changed(sel: Selection, sh: Shard, now: str) -> None:
    raise StoreError(
        f"{sel.specs[sh.store].path}: shard {sh.file} now selects {now} rows instead of {sh.rows}; the shard "
        "changed after the loader was built: rebuild the loader (a resumed run needs the unchanged store)"
    )


def batch_arrays(batch: pa.RecordBatch, sel: Selection, sh: Shard, dim: int) -> tuple[np.ndarray, ...]:
    """Arrow columns → numpy without copying (lat/lon copy only if they hold nulls, which read as NaN)."""
    col = batch.column(2)
    if col.null_count:
        raise StoreError(
            f"{sel.specs[sh.store].path}: shard {sh.file}: {col.null_count} row(s) without an "
            "embedding; re-import or re-embed the store"
        )
    emb = col.flatten().to_numpy(zero_copy_only=True).reshape(len(col), dim)
    lat = batch.column(0).to_numpy(zero_copy_only=False)
    lon = batch.column(1).to_numpy(zero_copy_only=False)
    return lat, lon, emb


def check_coordinates(
    lat: np.ndarray, lon: np.ndarray, sel: Selection, sh: Shard, positions: np.ndarray | int
) -> None:
    """StoreError naming the store, shard and row id of the first NaN/out-of-range coordinate.

    ``positions``: each row's position in the shard's selected rows (or the position of the first row).
    """
    with np.errstate(invalid="ignore"):
        ok = (np.abs(lat) <= 90.0) & (np.abs(lon) <= 180.0)  # False for NaN
    if ok.all():
        return
    spec = sel.specs[sh.store]
    i = int(np.flatnonzero(~ok)[0])
    pos = int(positions[i]) if isinstance(positions, np.ndarray) else int(positions) + i
    row_id = _row_id(sh, sel, pos)
    raise StoreError(
        f"{spec.path}: shard {sh.file}: row id {row_id!r} (lat={lat[i]}, lon={lon[i]}) "
        f"has NaN or out-of-range coordinates; fix or drop the row and re-import the store "
        f"(`geoloc store verify {spec.path}`)"
    )


def _row_id(sh: Shard, sel: Selection, position: int) -> str | None:
    """The id of the ``position``-th selected row of a shard (only on the error path).

    Found by position, not by an SQL test on lat/lon: DuckDB 2.0.1 returned ``isnan(lat) = false`` and
    ``abs(lat) <= 90`` true for a NaN row (it seems to fold such tests with the Parquet min/max statistics,
    which leave NaN out).
    """
    q = (
        f"SELECT id FROM read_parquet({files_sql([sh.path])}){where_sql(sel.split, sel.where)} "
        f"LIMIT 1 OFFSET {int(position)}"
    )
    with contextlib.suppress(Exception):
        rows = connect().sql(q).fetchall()
        if rows:
            return str(rows[0][0])
    return None
