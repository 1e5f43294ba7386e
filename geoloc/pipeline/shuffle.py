"""The data order of an epoch: seeded shard order, row subsets, and windows shuffled in a resumable way.

Everything random here is a pure function of (seed, epoch, partition, ...) through :func:`seeded_rng`, so a
resumed run, another rank or another machine computes the same order without any saved random state:
- :func:`assign_partitions` splits the shards into S disjoint groups once (independent of seed and epoch);
- :func:`plan_epoch` lists each partition's reads for an epoch (weights, subsets, seeded shard order);
- :class:`PartitionReader` streams a partition's reads and shuffles them in windows of ``window`` rows,
  each permuted by its own generator, so starting mid-epoch reads only from the window holding the start.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import duckdb
import numpy as np

from geoloc.errors import ConfigError, StoreError
from geoloc.pipeline.selection import (
    READ_ROWS,
    Selection,
    Shard,
    batch_arrays,
    check_coordinates,
    query_error,
    shard_changed,
)
from geoloc.pipeline.sql import files_sql, first_line, where_sql
from geoloc.sphere import latlon_to_xyz

__all__ = ["EpochPlan", "PartitionReader", "Piece", "assign_partitions", "plan_epoch", "seeded_rng"]

# Tags that keep the random streams of the plan, the shard order, row subsets and the buffer independent.
_TAG_PLAN, _TAG_ORDER, _TAG_SUBSET, _TAG_BUFFER = 11, 13, 17, 19
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Piece:
    """One read of one shard in an epoch: every row (``take is None``) or a seeded subset of ``take`` rows."""

    shard: Shard
    take: int | None

    @property
    def rows(self) -> int:
        return self.shard.rows if self.take is None else self.take


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch reads: per partition, its pieces in read order and their rows; steps per rank."""

    pieces: tuple[tuple[Piece, ...], ...]  # per partition, in read order
    rows: tuple[int, ...]  # per partition
    steps: int


def assign_partitions(shards: Sequence[Shard], count: int) -> tuple[tuple[Shard, ...], ...]:
    """Shards → ``count`` disjoint groups with near-equal weighted row counts (greedy, largest first).

    Depends only on the shard list, never on the seed or the epoch, so a rank always owns the same files.
    """
    load = [0.0] * count
    groups: list[list[Shard]] = [[] for _ in range(count)]
    for sh in sorted(shards, key=lambda s: (-s.rows * s.weight, s.index)):
        p = min(range(count), key=lambda i: (load[i], i))
        groups[p].append(sh)
        load[p] += sh.rows * sh.weight
    return tuple(tuple(sorted(g, key=lambda s: s.index)) for g in groups)


def seeded_rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (each reduced to 64 bits): independent streams per key."""
    return np.random.default_rng([k & _U64 for k in key])


def plan_epoch(
    sel: Selection,
    groups: Sequence[Sequence[Shard]],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    sub_batch: int,
    drop_last: bool,
) -> EpochPlan:
    """The epoch's pieces for ALL partitions (every rank computes the same plan: it is tiny).

    Integer weights repeat a shard; a fractional weight draws a seeded subset of the store's rows, spread
    over its shards; with ``shuffle`` each partition reads its pieces in a seeded order.
    """
    rng = seeded_rng(seed, epoch, _TAG_PLAN)
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
    pieces_per: list[tuple[Piece, ...]] = []
    for p, group in enumerate(groups):
        pieces = []
        for sh in group:
            pieces += [Piece(sh, None)] * math.floor(sh.weight)
            if take.get(sh.index, 0) > 0:
                pieces.append(Piece(sh, take[sh.index]))
        if shuffle:
            order = seeded_rng(seed, epoch, p, _TAG_ORDER).permutation(len(pieces))
            pieces = [pieces[i] for i in order]
        pieces_per.append(tuple(pieces))
    rows = tuple(sum(pc.rows for pc in ps) for ps in pieces_per)
    b = sub_batch
    steps = min(r // b for r in rows) if drop_last else max(-(-r // b) for r in rows)
    return EpochPlan(tuple(pieces_per), rows, steps)


def read_piece(
    con: duckdb.DuckDBPyConnection,
    piece: Piece,
    sel: Selection,
    subset_rng: np.random.Generator | None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream one shard as (emb float32 (n, dim), xyz float32 (n, 3)) chunks; checks every coordinate."""
    sh = piece.shard
    dim = sel.dim
    q = (
        f"SELECT lat, lon, emb::FLOAT[{dim}] AS emb FROM read_parquet({files_sql([sh.path])})"
        f"{where_sql(sel.split, sel.where)}"
    )
    chosen = None
    if piece.take is not None:
        assert subset_rng is not None
        chosen = np.sort(subset_rng.choice(sh.rows, piece.take, replace=False))
    try:
        reader = con.sql(q).to_arrow_reader(READ_ROWS)
    except Exception as e:
        raise query_error(e, sel.specs[sh.store].path, sel.where) from e
    offset = 0
    try:
        for batch in reader:
            n = batch.num_rows
            if n == 0:
                continue
            if offset + n > sh.rows:
                shard_changed(sel, sh, f"more than {sh.rows}")
            lat, lon, emb = batch_arrays(batch, sel, sh, dim)
            positions: np.ndarray | int = offset
            if chosen is not None:
                lo, hi = np.searchsorted(chosen, [offset, offset + n])
                positions = chosen[lo:hi]
                local = positions - offset
                lat, lon, emb = lat[local], lon[local], emb[local]
            offset += n
            if len(lat):
                check_coordinates(lat, lon, sel, sh, positions)
                yield emb, latlon_to_xyz(np.stack([lat, lon], axis=-1))
    except Exception as e:
        if isinstance(e, (StoreError, ConfigError)):
            raise
        raise StoreError(
            f"{sel.specs[sh.store].path}: shard {sh.file}: read failed: {first_line(e)}; "
            f"run `geoloc store verify {sel.specs[sh.store].path}`"
        ) from e
    finally:
        reader.close()
    if offset != sh.rows:
        shard_changed(sel, sh, str(offset))


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
        idx = self.order[self.pos : self.pos + k]
        self.pos += len(idx)
        if len(self.embs) == 1:
            np.take(self.embs[0], idx, axis=0, out=out_emb[: len(idx)])
            np.take(self.xyzs[0], idx, axis=0, out=out_xyz[: len(idx)])
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


class PartitionReader:
    """One partition's rows for one epoch, in an order that is a pure function of (seed, epoch, partition).

    The partition's pieces, read in plan order, form a stream of ``n`` rows. With ``shuffle`` the stream is
    cut into windows of ``window`` rows and each window is permuted by its own seeded generator; output
    position q is stream row ``w·window + perm_w[q mod window]``, w = q // window, and sub-batch j is
    positions [j·b, (j+1)·b). Because no state carries from one window to the next, starting at position
    ``start`` (resume) reads only from the window that holds it: earlier pieces are not even opened.
    """

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        sel: Selection,
        pieces: Sequence[Piece],
        *,
        seed: int,
        epoch: int,
        partition: int,
        window: int,
        shuffle: bool,
        start: int = 0,
    ) -> None:
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
            sub_rng = seeded_rng(seed, epoch, partition, j, _TAG_SUBSET) if piece.take is not None else None
            for emb, xyz in read_piece(self._con, piece, self._sel, sub_rng):
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
        order = (
            seeded_rng(seed, epoch, partition, self._w, _TAG_BUFFER).permutation(got)
            if self._shuffle
            else np.arange(got)
        )
        self._cur = _Window(embs, xyzs, order)
        self._w += 1
        return True

    def take(self, k: int, out_emb: np.ndarray, out_xyz: np.ndarray) -> int:
        """Fill ``out_*[:k]`` with the next ``k`` rows; returns how many there were (< k at the stream
        end)."""
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
