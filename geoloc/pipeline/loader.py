"""Feature store → torch batches: DuckDB reads, a seeded shuffle, partitions for DDP, exact resume.

The trainer needs (cond, xyz) pairs fast and in a reproducible order, from stores far larger than memory.
Each shard listed in a store's manifest is read with its own DuckDB query (``read_parquet([file])`` with the
split and an optional SQL ``where``), as Arrow record batches whose columns become numpy views without a
copy; every later step (the coordinate check, latlon → xyz, the shuffle) is a vectorised numpy/torch call
over a whole chunk — there is no per-row Python anywhere.

Order of the rows within an epoch:
- The selected shards are split into ``partitions`` (S) disjoint groups once, balanced by row count and
  independent of the epoch and the seed. A global batch of B rows is the concatenation, in partition order,
  of S sub-batches of B/S rows, sub-batch p coming from partition p's own stream. Under DDP, rank r of W reads
  only partitions [r·S/W, (r+1)·S/W) and yields its B/W rows, so the ranks together yield exactly the batch a
  single process yields with the same S and seed (the partitions, not the processes, define the data order).
- Per epoch each partition reads its shards in a seeded random order (the reference shuffles shard names,
  §2.1) and shuffles the resulting stream in windows of ``shuffle_buffer / S`` rows: the Arrow chunks of a
  window are kept as they are and a seeded index permutation over the window decides the order in which its
  rows leave, each row copied once, straight into the batch. The windows are cut by row count, so the order
  does not depend on how DuckDB chunks its output, and each window has its own generator, so the order is a
  pure function of (seed, epoch, partition) — ``numpy.random.default_rng([seed, epoch, partition, ...])``.
- Several stores mix by weight = expected passes per epoch (the reference's combined set lists OSV-5M and
  iNat21 twice, §2.5: that is weight 2 here). An integer part k reads each shard k times; a fractional part f
  takes a seeded random ``round(f·rows)`` of the store's rows (spread over its shards by a multivariate
  hypergeometric draw), different every epoch.
- An epoch has the same number of steps on every rank, computed from the row counts of all partitions:
  with ``drop_last`` the smallest partition sets it (the rows a bigger partition has left over are skipped
  for this epoch only — balance keeps that small), otherwise the largest does and exhausted partitions
  contribute shorter (possibly empty) sub-batches.

Resume: :meth:`FeatureLoader.state_dict` records (epoch, batches consumed in it). A new iterator opens each
partition's stream at the window holding that position (earlier shards are not even read) and continues
with the batches the uninterrupted run would have produced. Batches are produced in a background thread
``prefetch`` batches ahead; closing or dropping the iterator stops it, and its errors reach the consumer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geoloc.errors import ConfigError, StoreError
from geoloc.pipeline.store import BackboneInfo, FeatureStore
from geoloc.sphere import latlon_to_xyz

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

__all__ = [
    "EvalBatch",
    "FeatureLoader",
    "LoaderIterator",
    "StoreSpec",
    "iter_eval_batches",
    "read_tensors",
]

STATE_VERSION = 1
_READ_ROWS = 8192  # rows per Arrow record batch requested from DuckDB
# Tags that keep the random streams of the plan, the shard order, row subsets and the buffer independent.
_TAG_PLAN, _TAG_ORDER, _TAG_SUBSET, _TAG_BUFFER = 11, 13, 17, 19
_U64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class StoreSpec:
    """One store to read and its weight: the expected number of passes over it per epoch.

    ``weight=2.0`` reads every selected row twice per epoch (the reference's combined setup lists OSV-5M and
    iNat21 twice, plonk-reference §2.5); ``0.5`` reads a seeded random half of it, a different half each epoch.
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
class _Shard:
    index: int  # position in the loader's global shard list (store order, then manifest order)
    store: int  # index into the loader's stores
    path: Path
    file: str  # path relative to the store root, as listed in store.json
    sha256: str
    rows: int  # rows after the split and where filters
    weight: float


@dataclass(frozen=True)
class _Piece:
    """One read of one shard in an epoch: every row (``take is None``) or a seeded subset of ``take`` rows."""

    shard: _Shard
    take: int | None

    @property
    def rows(self) -> int:
        return self.shard.rows if self.take is None else self.take


@dataclass(frozen=True)
class _EpochPlan:
    pieces: tuple[tuple[_Piece, ...], ...]  # per partition, in read order
    rows: tuple[int, ...]  # per partition
    steps: int


@dataclass
class _Selection:
    """Stores opened and checked, and the selected row count of every shard."""

    specs: tuple[StoreSpec, ...]
    stores: tuple[FeatureStore, ...]
    shards: tuple[_Shard, ...]
    rows_per_store: tuple[int, ...]
    split: str | None
    where: str | None

    @property
    def dim(self) -> int:
        return self.stores[0].dim

    @property
    def backbone_name(self) -> str:
        return self.stores[0].backbone.name


# ---------------------------------------------------------------------------------------------- SQL
def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _files_sql(paths: Sequence[Path]) -> str:
    return "[" + ", ".join(_sql_str(str(p)) for p in paths) + "]"


def _where_sql(split: str | None, where: str | None, extra: str | None = None) -> str:
    conds = []
    if split is not None:
        conds.append(f"split = {_sql_str(split)}")
    if where:
        conds.append(f"({where})")
    if extra:
        conds.append(f"({extra})")
    return (" WHERE " + " AND ".join(conds)) if conds else ""


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _connect() -> duckdb.DuckDBPyConnection:
    import duckdb

    con = duckdb.connect(":memory:")
    # The data order must not depend on thread timing: keep DuckDB's scan order (the default, made explicit).
    con.execute("SET preserve_insertion_order = true")
    return con


# ---------------------------------------------------------------------------------------------- selection
def _select(
    stores: Sequence[str | Path | StoreSpec | FeatureStore],
    split: str | None,
    where: str | None,
    expected_dim: int | None,
    expected_backbone: str | None,
) -> _Selection:
    """Open every store, check they agree (and match the model), count the selected rows of every shard."""
    # An already opened FeatureStore is used as is (the eval job opens each store once and reads it twice).
    specs = tuple(StoreSpec(s.root) if isinstance(s, FeatureStore) else StoreSpec.parse(s) for s in stores)
    if not specs:
        raise ConfigError("no feature store given; pass at least one --store PATH[:WEIGHT]")
    where = where.strip() if where and where.strip() else None
    opened = tuple(s if isinstance(s, FeatureStore) else FeatureStore.open(p.path)
                   for s, p in zip(stores, specs, strict=True))
    first = opened[0]
    for spec, st in zip(specs[1:], opened[1:], strict=True):
        if (st.backbone.name, st.dim) != (first.backbone.name, first.dim):
            raise StoreError(
                f"{spec.path} holds {st.backbone.name!r} {st.dim}-d embeddings but {specs[0].path} holds "
                f"{first.backbone.name!r} {first.dim}-d; only stores embedded with the same backbone can be mixed"
            )
    if (expected_dim is not None and int(expected_dim) != first.dim) or (
        expected_backbone is not None and expected_backbone != first.backbone.name
    ):
        want = " ".join(x for x in (repr(expected_backbone) if expected_backbone is not None else "",
                                    f"{expected_dim}-d" if expected_dim is not None else "") if x)
        raise StoreError(
            f"{specs[0].path} holds {first.backbone.name!r} {first.dim}-d embeddings but the model expects "
            f"{want} embeddings; use a store embedded with the model's backbone, or train a new model on it"
        )
    con = _connect()
    shards: list[_Shard] = []
    per_store: list[int] = []
    for si, (spec, st) in enumerate(zip(specs, opened, strict=True)):
        # Only the shards listed in store.json (never a glob: unlisted files are orphans of killed jobs).
        by_path = {st.root / r["file"]: r for r in st.shard_records}
        listed = st.shard_paths(split)
        records = [by_path[p] for p in listed]
        paths = [p.resolve() for p in listed]
        counts: dict[str, int] = {}
        if paths:
            q = (f"SELECT filename, count(*) FROM read_parquet({_files_sql(paths)}, filename = true)"
                 f"{_where_sql(split, where)} GROUP BY filename")
            try:
                counts = {str(f): int(n) for f, n in con.sql(q).fetchall()}
            except Exception as e:  # duckdb.Error: a bad --where, or an unreadable shard
                raise _query_error(e, spec.path, where) from e
        total = 0
        for r, p in zip(records, paths, strict=True):
            n = counts.get(str(p), 0)
            if n:
                shards.append(_Shard(len(shards), si, p, str(r["file"]), str(r.get("sha256", "")), n, spec.weight))
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
    return _Selection(specs, opened, tuple(shards), tuple(per_store), split, where)


def _query_error(e: Exception, store: Path, where: str | None) -> Exception:
    import duckdb

    if where and isinstance(e, duckdb.Error) and not isinstance(e, duckdb.IOException):
        return ConfigError(f"--where {where!r} does not work on store {store}: {_first_line(e)}")
    return StoreError(f"{store}: reading the shards failed: {_first_line(e)}; run `geoloc store verify {store}`")


def _assign_partitions(shards: Sequence[_Shard], count: int) -> tuple[tuple[_Shard, ...], ...]:
    """Shards → ``count`` disjoint groups with near-equal weighted row counts (greedy, largest first).

    Depends only on the shard list, never on the seed or the epoch, so a rank always owns the same files.
    """
    load = [0.0] * count
    groups: list[list[_Shard]] = [[] for _ in range(count)]
    for sh in sorted(shards, key=lambda s: (-s.rows * s.weight, s.index)):
        p = min(range(count), key=lambda i: (load[i], i))
        groups[p].append(sh)
        load[p] += sh.rows * sh.weight
    return tuple(tuple(sorted(g, key=lambda s: s.index)) for g in groups)


# ---------------------------------------------------------------------------------------------- reading
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k & _U64 for k in key])


def _read_piece(
    con: duckdb.DuckDBPyConnection,
    piece: _Piece,
    sel: _Selection,
    subset_rng: np.random.Generator | None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream one shard as (emb float32 (n, dim), xyz float32 (n, 3)) chunks; checks every coordinate."""
    sh = piece.shard
    dim = sel.dim
    q = (f"SELECT lat, lon, emb::FLOAT[{dim}] AS emb FROM read_parquet({_files_sql([sh.path])})"
         f"{_where_sql(sel.split, sel.where)}")
    chosen = None
    if piece.take is not None:
        assert subset_rng is not None
        chosen = np.sort(subset_rng.choice(sh.rows, piece.take, replace=False))
    try:
        reader = con.sql(q).to_arrow_reader(_READ_ROWS)
    except Exception as e:
        raise _query_error(e, sel.specs[sh.store].path, sel.where) from e
    offset = 0
    try:
        for batch in reader:
            n = batch.num_rows
            if n == 0:
                continue
            if offset + n > sh.rows:
                _changed(sel, sh, f"more than {sh.rows}")
            lat, lon, emb = _batch_arrays(batch, sel, sh, dim)
            positions: np.ndarray | int = offset
            if chosen is not None:
                lo, hi = np.searchsorted(chosen, [offset, offset + n])
                positions = chosen[lo:hi]
                local = positions - offset
                lat, lon, emb = lat[local], lon[local], emb[local]
            offset += n
            if len(lat):
                _check_coordinates(lat, lon, sel, sh, positions)
                yield emb, latlon_to_xyz(np.stack([lat, lon], axis=-1))
    except Exception as e:
        if isinstance(e, (StoreError, ConfigError)):
            raise
        raise StoreError(f"{sel.specs[sh.store].path}: shard {sh.file}: read failed: {_first_line(e)}; "
                         f"run `geoloc store verify {sel.specs[sh.store].path}`") from e
    finally:
        reader.close()
    if offset != sh.rows:
        _changed(sel, sh, str(offset))


def _changed(sel: _Selection, sh: _Shard, now: str) -> None:
    raise StoreError(
        f"{sel.specs[sh.store].path}: shard {sh.file} now selects {now} rows instead of {sh.rows}; the shard "
        "changed after the loader was built: rebuild the loader (a resumed run needs the unchanged store)"
    )


def _batch_arrays(batch: pa.RecordBatch, sel: _Selection, sh: _Shard, dim: int) -> tuple[np.ndarray, ...]:
    """Arrow columns → numpy without copying (lat/lon copy only if they hold nulls, which then read as NaN)."""
    col = batch.column(2)
    if col.null_count:
        raise StoreError(f"{sel.specs[sh.store].path}: shard {sh.file}: {col.null_count} row(s) without an "
                         "embedding; re-import or re-embed the store")
    emb = col.flatten().to_numpy(zero_copy_only=True).reshape(len(col), dim)
    lat = batch.column(0).to_numpy(zero_copy_only=False)
    lon = batch.column(1).to_numpy(zero_copy_only=False)
    return lat, lon, emb


def _check_coordinates(lat: np.ndarray, lon: np.ndarray, sel: _Selection, sh: _Shard,
                       positions: np.ndarray | int) -> None:
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
        f"{spec.path}: shard {sh.file}: row id {row_id!r} (lat={lat[i]}, lon={lon[i]}) has NaN or out-of-range "
        f"coordinates; fix or drop the row and re-import the store (`geoloc store verify {spec.path}`)"
    )


def _row_id(sh: _Shard, sel: _Selection, position: int) -> str | None:
    """The id of the ``position``-th selected row of a shard (only on the error path).

    Found by position, not by an SQL test on lat/lon: DuckDB 2.0.1 returned ``isnan(lat) = false`` and
    ``abs(lat) <= 90`` true for a NaN row (it seems to fold such tests with the Parquet min/max statistics,
    which leave NaN out).
    """
    q = (f"SELECT id FROM read_parquet({_files_sql([sh.path])}){_where_sql(sel.split, sel.where)} "
         f"LIMIT 1 OFFSET {int(position)}")
    with contextlib.suppress(Exception):
        rows = _connect().sql(q).fetchall()
        if rows:
            return str(rows[0][0])
    return None


# ---------------------------------------------------------------------------------------------- streams
class _Window:
    """Up to ``window`` consecutive stream rows, kept as the Arrow-backed chunks they arrived in (no copy),
    and the order in which they leave: a seeded permutation (identity without shuffle)."""

    def __init__(self, embs: list[np.ndarray], xyzs: list[np.ndarray], order: np.ndarray) -> None:
        self.embs, self.xyzs = embs, xyzs
        self.starts = np.cumsum([0, *(len(e) for e in embs)])
        self.order = order
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.order) - self.pos

    def take(self, k: int, out_emb: np.ndarray, out_xyz: np.ndarray) -> int:
        """Copy the next ``k`` rows (fewer if the window runs out) into ``out_*[:k]``: one copy per row.

        A batch's rows are grouped by source chunk (random within each group), so each chunk is one
        ``np.take`` straight into the output; batches are sets to the loss, so that order is immaterial.
        """
        idx = self.order[self.pos:self.pos + k]
        self.pos += len(idx)
        if len(self.embs) == 1:
            np.take(self.embs[0], idx, axis=0, out=out_emb[:len(idx)])
            np.take(self.xyzs[0], idx, axis=0, out=out_xyz[:len(idx)])
            return len(idx)
        chunk = np.searchsorted(self.starts, idx, side="right") - 1
        by_chunk = np.argsort(chunk, kind="stable")
        idx, chunk = idx[by_chunk], chunk[by_chunk]
        bounds = np.searchsorted(chunk, np.arange(len(self.embs) + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            lo, hi = bounds[c], bounds[c + 1]
            local = idx[lo:hi] - self.starts[c]
            np.take(self.embs[c], local, axis=0, out=out_emb[lo:hi])
            np.take(self.xyzs[c], local, axis=0, out=out_xyz[lo:hi])
        return len(idx)


class _PartitionReader:
    """One partition's rows for one epoch, in an order that is a pure function of (seed, epoch, partition).

    The partition's pieces, read in plan order, form a stream of ``n`` rows. With ``shuffle`` the stream is
    cut into windows of ``window`` rows and each window is permuted by its own seeded generator; output
    position q is stream row ``w·window + perm_w[q mod window]``, w = q // window, and sub-batch j is positions
    [j·b, (j+1)·b). Because no state carries from one window to the next, starting at position ``start``
    (resume) reads only from the window that holds it: earlier pieces are not even opened.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, sel: _Selection, pieces: Sequence[_Piece], *, seed: int,
                 epoch: int, partition: int, window: int, shuffle: bool, start: int = 0) -> None:
        self._con, self._sel, self._pieces = con, sel, list(pieces)
        self._key = (seed, epoch, partition)
        self._shuffle = shuffle
        self._window_rows = window
        self.n = sum(p.rows for p in pieces)
        start = min(start, self.n)
        self._w = start // window  # index of the next window to load
        self._src = _Chunks(self._chunks(self._w * window))
        self._cur: _Window | None = None
        if start % window:
            self._load()
            assert self._cur is not None
            self._cur.pos = start % window

    def _chunks(self, first_row: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The stream from row ``first_row`` on; whole pieces before it are skipped without reading."""
        seed, epoch, partition = self._key
        skip = first_row
        for j, piece in enumerate(self._pieces):
            if skip >= piece.rows:
                skip -= piece.rows
                continue
            sub_rng = _rng(seed, epoch, partition, j, _TAG_SUBSET) if piece.take is not None else None
            for emb, xyz in _read_piece(self._con, piece, self._sel, sub_rng):
                if skip >= len(emb):
                    skip -= len(emb)
                    continue
                yield emb[skip:], xyz[skip:]
                skip = 0

    def _load(self) -> bool:
        self._cur = None  # let the spent window go before reading the next: one window in memory, not two
        embs, xyzs, got = [], [], 0
        while got < self._window_rows:
            rows = self._src.next_rows(self._window_rows - got)
            if rows is None:
                break
            embs.append(rows[0])
            xyzs.append(rows[1])
            got += len(rows[0])
        if not got:
            return False
        seed, epoch, partition = self._key
        order = (_rng(seed, epoch, partition, self._w, _TAG_BUFFER).permutation(got) if self._shuffle
                 else np.arange(got))
        self._cur = _Window(embs, xyzs, order)
        self._w += 1
        return True

    def take(self, k: int, out_emb: np.ndarray, out_xyz: np.ndarray) -> int:
        """Fill ``out_*[:k]`` with the next ``k`` rows; returns how many there were (< k at the stream end)."""
        filled = 0
        while filled < k:
            if (self._cur is None or not self._cur.left) and not self._load():
                break
            assert self._cur is not None
            filled += self._cur.take(k - filled, out_emb[filled:], out_xyz[filled:])
        return filled

    def close(self) -> None:
        self._cur = None
        self._src.close()
        self._con.close()


class _Chunks:
    """An iterator of row chunks with a cursor, so a consumer can take exactly as many rows as it needs."""

    def __init__(self, chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> None:
        self._it = chunks
        self._cur: tuple[np.ndarray, np.ndarray] | None = None
        self._pos = 0

    def close(self) -> None:
        self._cur = None
        with contextlib.suppress(Exception):
            self._it.close()  # type: ignore[attr-defined]

    def next_rows(self, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Up to ``limit`` rows (views) from the current chunk; None when the stream is exhausted."""
        while self._cur is None or self._pos >= len(self._cur[0]):
            nxt = next(self._it, None)
            if nxt is None:
                return None
            self._cur, self._pos = nxt, 0
        a, b = self._pos, min(self._pos + limit, len(self._cur[0]))
        self._pos = b
        return self._cur[0][a:b], self._cur[1][a:b]


# ---------------------------------------------------------------------------------------------- loader
class FeatureLoader:
    """Training batches ``(cond (B, dim) float32, xyz (B, 3) float32)`` from one or more feature stores.

    See the module docstring for the order of rows, partitions and DDP. With ``shuffle=True`` iteration runs
    over epochs forever; with ``shuffle=False`` one ``iter()`` is one pass, in store and shard order.

    Args:
        stores: store paths, ``"PATH:WEIGHT"`` strings or :class:`StoreSpec`; all must hold the same backbone.
        batch_size: the GLOBAL batch B (all ranks together); each rank yields B / world_size rows.
        split: rows of this split only (None: every row).
        where: an SQL condition on the store's columns, e.g. ``"unique_country <> 'FR'"``.
        seed: with the epoch and partition, seeds every random choice; same seed → same batches.
        shuffle_buffer: rows per shuffle window, in total over the S partitions (each shuffles windows of
            max(shuffle_buffer / S, B / S) rows); a process holds its partitions' windows, about
            ``shuffle_buffer / world_size * (dim + 5) * 4`` bytes (200 MB for 65,536 rows of 768-d).
        partitions: S, the number of disjoint shard groups (see module docstring); must divide B, and
            world_size must divide S. Keep S fixed to keep the data order when the number of GPUs changes.
        rank, world_size: this process's place under DDP.
        drop_last: every batch full (the epoch ends when the smallest partition runs out); else the last
            batches of an epoch may be short.
        prefetch: batches produced ahead in a background thread (0: produce in the caller's thread).
        expected_dim, expected_backbone: what the model (checkpoint) was trained on; StoreError on mismatch.
        pin_memory: allocate batches in pinned memory, for ``.to(device, non_blocking=True)`` (ignored
            where CUDA is not available).
    """

    def __init__(
        self,
        stores: Sequence[str | Path | StoreSpec],
        batch_size: int,
        *,
        split: str | None = "train",
        where: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 65536,
        partitions: int = 1,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        prefetch: int = 4,
        expected_dim: int | None = None,
        expected_backbone: str | None = None,
        pin_memory: bool = False,
    ) -> None:
        batch_size, partitions, world_size, rank = int(batch_size), int(partitions), int(world_size), int(rank)
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if partitions <= 0:
            raise ConfigError(f"partitions must be positive, got {partitions}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % partitions:
            raise ConfigError(f"batch_size {batch_size} is not divisible by partitions {partitions}; use a batch "
                              f"size that is a multiple of {partitions} (or fewer partitions)")
        if partitions % world_size:
            raise ConfigError(f"partitions {partitions} is not divisible by world_size {world_size}; set "
                              f"partitions to a multiple of the number of processes (e.g. {world_size})")
        if prefetch < 0 or shuffle_buffer < 0:
            raise ConfigError("prefetch and shuffle_buffer must be >= 0")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = int(shuffle_buffer)
        self.partitions = partitions
        self.rank = rank
        self.world_size = world_size
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()  # pinning needs CUDA; else a no-op
        self._sel = _select(stores, split, where, expected_dim, expected_backbone)
        if len(self._sel.shards) < partitions:
            raise ConfigError(
                f"partitions {partitions} exceeds the {len(self._sel.shards)} shard(s) with selected rows; use "
                f"partitions <= {len(self._sel.shards)} (and a world size that divides it), or write the store "
                "in more, smaller shards"
            )
        self._groups = _assign_partitions(self._sel.shards, partitions)
        self.sub_batch = batch_size // partitions
        per_rank = partitions // world_size
        self.local_partitions = range(rank * per_rank, (rank + 1) * per_rank)
        self.local_batch_size = self.sub_batch * per_rank
        # Unshuffled, a window only groups rows for the copy: one sub-batch of them is enough.
        self._window = max(self.shuffle_buffer // partitions if self.shuffle else 0, self.sub_batch)
        self._plans: dict[int, _EpochPlan] = {}
        self._lock = threading.Lock()
        self._epoch = 0
        self._batch = 0
        self._batches_total = 0
        self._generation = 0
        if self.batches_in_epoch(0) == 0:
            raise ConfigError(
                f"batch_size {batch_size} is larger than the data: partition rows per epoch are "
                f"{list(self._plan(0).rows)}; use a smaller batch size, fewer partitions or drop_last=False"
            )

    # ------------------------------------------------------------------ description
    @property
    def dim(self) -> int:
        return self._sel.dim

    @property
    def backbone_name(self) -> str:
        return self._sel.backbone_name

    @property
    def backbone(self) -> BackboneInfo:
        """The first store's :class:`~geoloc.pipeline.store.BackboneInfo` (all stores share name and dim)."""
        return self._sel.stores[0].backbone

    @property
    def stores(self) -> tuple[StoreSpec, ...]:
        return self._sel.specs

    @property
    def split(self) -> str | None:
        return self._sel.split

    @property
    def where(self) -> str | None:
        return self._sel.where

    @property
    def num_rows(self) -> int:
        """Selected rows (after split and where), one pass over every store, before weights."""
        return sum(self._sel.rows_per_store)

    @property
    def rows_per_store(self) -> tuple[int, ...]:
        return self._sel.rows_per_store

    @property
    def batches_per_epoch(self) -> int:
        """Batches in epoch 0 (with a fractional store weight and several partitions, later epochs can differ
        slightly: the random subset lands unevenly on the partitions; see :meth:`batches_in_epoch`)."""
        return self.batches_in_epoch(0)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches of it the consumer has taken): where the next batch comes from."""
        with self._lock:
            return self._epoch, self._batch

    def batches_in_epoch(self, epoch: int) -> int:
        return self._plan(epoch).steps

    def partition_rows(self, epoch: int = 0) -> tuple[int, ...]:
        """Rows each partition offers in ``epoch`` (weights applied)."""
        return self._plan(epoch).rows

    def fingerprint(self) -> str:
        """sha256 of what defines the data order: shards (file, checksum, selected rows), weights, filters."""
        doc = {
            "shards": [[sh.store, sh.file, sh.sha256, sh.rows, sh.weight] for sh in self._sel.shards],
            "split": self._sel.split, "where": self._sel.where,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        """JSON-able data provenance for a checkpoint's config.json."""
        return {
            "stores": [
                {"path": str(spec.path.resolve()), "weight": spec.weight, "backbone": st.backbone.to_json(),
                 "shards": sum(1 for sh in self._sel.shards if sh.store == i), "rows": rows,
                 "sources": st.sources}
                for i, (spec, st, rows) in enumerate(zip(self._sel.specs, self._sel.stores,
                                                         self._sel.rows_per_store, strict=True))
            ],
            "split": self.split, "where": self.where, "rows": self.num_rows,
            "batch_size": self.batch_size, "partitions": self.partitions, "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer, "drop_last": self.drop_last,
            "batches_per_epoch": self.batches_per_epoch, "fingerprint": self.fingerprint(),
        }

    def __repr__(self) -> str:
        return (f"FeatureLoader({', '.join(map(str, self.stores))}, batch_size={self.batch_size}, "
                f"rows={self.num_rows}, dim={self.dim}, partitions={self.partitions}, "
                f"rank={self.rank}/{self.world_size})")

    # ------------------------------------------------------------------ plan
    def _plan(self, epoch: int) -> _EpochPlan:
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = self._make_plan(epoch)
                if len(self._plans) > 8:
                    self._plans.clear()
                self._plans[epoch] = plan
            return plan

    def _make_plan(self, epoch: int) -> _EpochPlan:
        """The epoch's pieces for ALL partitions (every rank computes the same plan: it is tiny)."""
        sel = self._sel
        rng = _rng(self.seed, epoch, _TAG_PLAN)
        take: dict[int, int] = {}
        for si, spec in enumerate(sel.specs):
            frac = spec.weight - math.floor(spec.weight)
            if frac <= 0:
                continue
            own = [sh for sh in sel.shards if sh.store == si]
            counts = np.asarray([sh.rows for sh in own], np.int64)
            k = round(frac * int(counts.sum()))
            drawn = rng.multivariate_hypergeometric(counts, k) if k else np.zeros(len(own), np.int64)
            take.update({sh.index: int(d) for sh, d in zip(own, drawn, strict=True)})
        pieces_per: list[tuple[_Piece, ...]] = []
        for p, group in enumerate(self._groups):
            pieces = []
            for sh in group:
                pieces += [_Piece(sh, None)] * math.floor(sh.weight)
                if take.get(sh.index, 0) > 0:
                    pieces.append(_Piece(sh, take[sh.index]))
            if self.shuffle:
                order = _rng(self.seed, epoch, p, _TAG_ORDER).permutation(len(pieces))
                pieces = [pieces[i] for i in order]
            pieces_per.append(tuple(pieces))
        rows = tuple(sum(pc.rows for pc in ps) for ps in pieces_per)
        b = self.sub_batch
        steps = min(r // b for r in rows) if self.drop_last else max(-(-r // b) for r in rows)
        return _EpochPlan(tuple(pieces_per), rows, steps)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Where the consumer is: the epoch and the batches it has taken from it (JSON-serialisable)."""
        with self._lock:
            epoch, batch, total = self._epoch, self._batch, self._batches_total
        return {
            "version": STATE_VERSION, "epoch": epoch, "batch_in_epoch": batch, "batches_total": total,
            "seed": self.seed, "batch_size": self.batch_size, "partitions": self.partitions,
            "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "drop_last": self.drop_last,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict, *, strict: bool = True) -> None:
        """Continue exactly where ``state`` was taken: the next ``iter()`` yields the batches that would have
        come next. ``strict`` (default) refuses a state from different settings or different data, which
        could not reproduce the order; ``strict=False`` takes only the position."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"loader state version {state.get('version')!r} is not supported "
                              f"(expected {STATE_VERSION})")
        if strict:
            for key in ("seed", "batch_size", "partitions", "shuffle", "shuffle_buffer", "drop_last"):
                if state.get(key) != getattr(self, key):
                    raise ConfigError(
                        f"cannot resume the data order: the saved loader had {key}={state.get(key)!r}, this one "
                        f"has {getattr(self, key)!r}; use the same setting (or start a new run with --init-from)"
                    )
            if state.get("fingerprint") != self.fingerprint():
                raise StoreError(
                    "cannot resume the data order: the stores, split or where filter differ from the saved run "
                    "(shards added or changed?); resume on the same data, or fine-tune with --init-from"
                )
        with self._lock:
            self._epoch = int(state["epoch"])
            self._batch = int(state["batch_in_epoch"])
            self._batches_total = int(state.get("batches_total", 0))
            self._generation += 1

    def _advance(self, generation: int, epoch: int, batch: int, steps: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # a stale iterator (state loaded or a newer iterator started since)
            self._batches_total += 1
            if batch + 1 >= steps:
                self._epoch, self._batch = epoch + 1, 0
            else:
                self._epoch, self._batch = epoch, batch + 1

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> LoaderIterator:
        with self._lock:
            self._generation += 1
            gen, epoch, batch = self._generation, self._epoch, self._batch
        return LoaderIterator(self, gen, self._produce(epoch, batch), self.prefetch)

    def _produce(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int, int]]:
        """(cond, xyz, epoch, batch index, steps of the epoch) from (epoch, skip) on."""
        con = _connect()
        try:
            while True:
                plan = self._plan(epoch)
                if skip >= plan.steps:  # the saved position was the end of an epoch
                    epoch, skip = epoch + 1, 0
                    if not self.shuffle:
                        return
                    continue
                readers = [
                    _PartitionReader(con.cursor(), self._sel, plan.pieces[p], seed=self.seed, epoch=epoch,
                                     partition=p, window=self._window, shuffle=self.shuffle,
                                     start=skip * self.sub_batch)
                    for p in self.local_partitions
                ]
                try:
                    for k in range(skip, plan.steps):
                        cond, xyz = self._batch_out(readers)
                        yield cond, xyz, epoch, k, plan.steps
                finally:
                    for r in readers:
                        r.close()
                epoch, skip = epoch + 1, 0
                if not self.shuffle:
                    return
        finally:
            con.close()

    def _batch_out(self, readers: Sequence[_PartitionReader]) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = self.sub_batch, self.local_batch_size
        cond = torch.empty((n, self.dim), dtype=torch.float32, pin_memory=self.pin_memory)
        xyz = torch.empty((n, 3), dtype=torch.float32, pin_memory=self.pin_memory)
        cond_np, xyz_np = cond.numpy(), xyz.numpy()
        filled = [r.take(b, cond_np[i * b:(i + 1) * b], xyz_np[i * b:(i + 1) * b]) for i, r in enumerate(readers)]
        if all(f == b for f in filled):
            return cond, xyz
        keep = np.concatenate([np.arange(i * b, i * b + f) for i, f in enumerate(filled)]).astype(np.int64)
        idx = torch.from_numpy(keep)
        return cond[idx], xyz[idx]


_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _producer(items: Iterator[Any], q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        _put_final(q, stop, _END)
    except BaseException as e:  # handed to the consumer, which re-raises it
        _put_final(q, stop, _Raised(e))
    finally:
        with contextlib.suppress(Exception):
            items.close()  # type: ignore[attr-defined]


def _put_final(q: queue.Queue, stop: threading.Event, item: object) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _shutdown(stop: threading.Event, q: queue.Queue, thread: threading.Thread) -> None:
    stop.set()
    with contextlib.suppress(queue.Empty):
        while True:
            q.get_nowait()
    if thread is not threading.current_thread():
        thread.join(timeout=10)


class LoaderIterator:
    """The iterator ``iter(FeatureLoader)`` returns; ``close()`` (or dropping it) stops its thread."""

    def __init__(self, loader: FeatureLoader, generation: int, items: Iterator[Any], prefetch: int) -> None:
        self._loader = loader
        self._generation = generation
        self._done = False
        self._items: Iterator[Any] | None = None
        self._q: queue.Queue | None = None
        self._finalizer = None
        if prefetch == 0:
            self._items = items
            return
        self._q = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=_producer, args=(items, self._q, stop), name="geoloc-loader",
                                  daemon=True)
        # The thread and the finaliser hold only the queue and the event, never self, so dropping the
        # iterator triggers the finaliser, which stops the thread.
        self._finalizer = weakref.finalize(self, _shutdown, stop, self._q, thread)
        thread.start()

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._done:
            raise StopIteration
        if self._q is None:
            assert self._items is not None
            try:
                item = next(self._items)
            except StopIteration:
                self._done = True
                raise
        else:
            item = self._q.get()
            if item is _END:
                self.close()
                raise StopIteration
            if isinstance(item, _Raised):
                self.close()
                raise item.exc
        cond, xyz, epoch, k, steps = item
        self._loader._advance(self._generation, epoch, k, steps)
        return cond, xyz

    def close(self) -> None:
        """Stop producing (idempotent); the background thread exits and its DuckDB reads are closed."""
        self._done = True
        if self._finalizer is not None:
            self._finalizer()
        elif self._items is not None:
            with contextlib.suppress(Exception):
                self._items.close()  # type: ignore[attr-defined]

    def __enter__(self) -> LoaderIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalBatch:
    """One evaluation batch: ids, the condition, ground-truth degrees and the requested label columns."""

    ids: list[str]
    cond: torch.Tensor  # (B, dim) float32
    latlon: np.ndarray  # (B, 2) float64 degrees
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B,) object array (None = missing)

    def __len__(self) -> int:
        return len(self.ids)


def iter_eval_batches(
    stores: Sequence[str | Path | StoreSpec | FeatureStore] | str | Path,
    split: str | None,
    batch_size: int,
    where: str | None = None,
    label_columns: Sequence[str] = (),
    *,
    expected_dim: int | None = None,
    expected_backbone: str | None = None,
) -> Iterator[EvalBatch]:
    """Every selected row exactly once, in store then shard order, in batches of ``batch_size`` (the last
    one may be shorter). Weights are ignored. Rows with NaN/out-of-range coordinates raise StoreError."""
    if isinstance(stores, (str, Path, StoreSpec)):
        stores = [stores]
    if int(batch_size) <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    sel = _select(stores, split, where, expected_dim, expected_backbone)
    label_columns = tuple(label_columns)
    for spec, st in zip(sel.specs, sel.stores, strict=True):
        missing = [c for c in label_columns if c not in st.label_columns]
        if missing:
            raise StoreError(f"{spec.path}: no label column(s) {missing} (the store has "
                             f"{list(st.label_columns)}); evaluate without them or use another store")
    return _eval_batches(sel, int(batch_size), label_columns)


def _eval_batches(sel: _Selection, batch_size: int, label_columns: tuple[str, ...]) -> Iterator[EvalBatch]:
    import pyarrow as pa

    con = _connect()
    labels_sql = "".join(f", {_quote_ident(c)}" for c in label_columns)
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    try:
        for sh in sel.shards:
            q = (f"SELECT id, lat, lon{labels_sql}, emb::FLOAT[{sel.dim}] AS emb "
                 f"FROM read_parquet({_files_sql([sh.path])}){_where_sql(sel.split, sel.where)}")
            try:
                reader = con.sql(q).to_arrow_reader(_READ_ROWS)
            except Exception as e:
                raise _query_error(e, sel.specs[sh.store].path, sel.where) from e
            offset = 0
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                lat, lon, _ = _batch_arrays(batch.select(["lat", "lon", "emb"]), sel, sh, sel.dim)
                _check_coordinates(lat, lon, sel, sh, offset)
                offset += batch.num_rows
                pending.append(batch)
                pending_rows += batch.num_rows
                while pending_rows >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield _eval_batch(table.slice(0, batch_size), sel.dim, label_columns)
                    rest = table.slice(batch_size)
                    pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows:
            yield _eval_batch(pa.Table.from_batches(pending), sel.dim, label_columns)
    finally:
        con.close()


def _eval_batch(table: pa.Table, dim: int, label_columns: tuple[str, ...]) -> EvalBatch:
    # One copy of the embeddings (Arrow chunks → one contiguous, writable array); labels via Arrow's C++.
    cond = np.concatenate([c.flatten().to_numpy(zero_copy_only=False).reshape(len(c), dim)
                           for c in table.column("emb").chunks]).astype(np.float32, copy=False)
    lat = table.column("lat").to_numpy()
    lon = table.column("lon").to_numpy()
    labels = {c: table.column(c).to_numpy(zero_copy_only=False).astype(object, copy=False)
              for c in label_columns}
    return EvalBatch(ids=table.column("id").to_pylist(), cond=torch.from_numpy(cond),
                     latlon=np.stack([lat, lon], axis=1).astype(np.float64), labels=labels)


def read_tensors(
    stores: Sequence[str | Path | StoreSpec] | str | Path,
    split: str | None = "train",
    where: str | None = None,
    *,
    expected_dim: int | None = None,
    expected_backbone: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every selected row in memory, as ``(cond (N, dim) float32, xyz (N, 3) float32)``, in store order.

    For small stores and for benchmarks that compare training from memory with training from the loader.
    """
    conds, xyzs = [], []
    for batch in iter_eval_batches(stores, split, 65536, where, expected_dim=expected_dim,
                                   expected_backbone=expected_backbone):
        conds.append(batch.cond)
        xyzs.append(latlon_to_xyz(torch.from_numpy(batch.latlon)).to(torch.float32))
    return torch.cat(conds), torch.cat(xyzs)
