"""Parquet feature files as an import source: id / lat / lon columns and an embedding column.

The embedding may be a fixed-size list, a list (ragged rows become failures) or one numeric column per
dimension (``--emb-col 'emb_*'``). Files are read row group by row group through a buffered stream, and a
row group whose ids are all already in the store is passed on without decoding its embeddings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geoloc.config import ImportConfig
from geoloc.errors import InputError
from geoloc.pipeline.items import Failure
from geoloc.pipeline.source_common import Chunk, ParquetLike, expand_source, float_column, open_parquet

__all__ = ["ParquetSource"]


class ParquetSource(ParquetLike):
    """Parquet files with id / lat / lon and an embedding column (fixed-size list, list, or one per dim)."""

    kind = "parquet"

    def __init__(self, cfg: ImportConfig) -> None:
        self.cfg = cfg
        self.files = expand_source(cfg.source, (".parquet", ".pq"))
        self.dim: int | None = None
        first = open_parquet(self.files[0])
        schema = first.schema_arrow
        self._columns(schema.names, str(self.files[0]), with_emb=True)
        for c in self.emb_cols:
            t = schema.field(c).type
            inner = (
                t.value_type
                if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
                else t
            )
            numeric = pa.types.is_floating(inner) or pa.types.is_integer(inner)
            if not numeric or (len(self.emb_cols) > 1 and inner is not t):
                raise InputError(
                    f"{self.files[0]}: column {c!r} has type {t}; expected a list of numbers, or "
                    "--emb-col 'prefix_*' naming one numeric column per dimension"
                )
        self.total = 0
        for f in self.files:
            with contextlib.suppress(InputError):  # an unreadable file is reported when it is reached
                self.total += open_parquet(f).metadata.num_rows

    def chunks(self) -> Iterator[Chunk]:
        """Row group by row group; an unreadable row group or file becomes one failure that counts all its
        rows (from the Parquet metadata; unknown when even the footer is unreadable), and reading goes on
        with the next row group or file."""
        for path in self.files:
            pf = None
            try:
                pf = open_parquet(path)
                absent = [c for c in self.read_cols if c not in pf.schema_arrow.names]
                if absent:
                    raise InputError(f"missing column(s) {absent} that {self.files[0].name} has")
            except (InputError, OSError, pa.ArrowException) as e:
                rows = pf.metadata.num_rows if pf is not None else None
                yield self._lost(path, 0, rows, _why(e), "file skipped")
                continue
            offset = 0
            for rg in range(pf.num_row_groups):
                rg_rows = pf.metadata.row_group(rg).num_rows
                done = 0
                try:
                    ids = pf.read_row_group(rg, columns=[self.id_col]).column(0)
                    if self._all_known(ids):
                        yield self._stored_chunk(ids, path, offset)
                        done = len(ids)
                        continue
                    for batch in pf.iter_batches(
                        batch_size=self.cfg.chunk_rows,
                        row_groups=[rg],
                        columns=self.read_cols,
                        use_threads=True,
                    ):
                        emb, bad = self._embeddings(batch)
                        chunk = self._chunk(batch, emb, bad, path, offset + done)
                        done += batch.num_rows
                        yield chunk
                except (InputError, OSError, pa.ArrowException) as e:
                    yield self._lost(path, offset + done, rg_rows - done, _why(e), f"row group {rg} skipped")
                    # The buffered stream is left mid-page after a decode error: reopen for the next group.
                    try:
                        pf = open_parquet(path)
                    except InputError as e2:
                        rest = pf.metadata.num_rows - offset - rg_rows
                        yield self._lost(path, offset + rg_rows, rest, _why(e2), "rest of file skipped")
                        break
                finally:
                    offset += rg_rows

    def _lost(self, path: object, offset: int, rows: int | None, what: str, skipped: str) -> Chunk:
        span = (
            f"{rows} row(s) lost (rows {offset}–{offset + rows - 1})"
            if rows
            else "row count unknown, ≥1 row lost"
            if rows is None
            else "0 rows"
        )
        return _empty_chunk(
            Failure(
                id="",
                source=f"{path}:row {offset}",
                split=self.cfg.split or "",
                reason=f"{what}; {skipped}, {span}",
            ),
            rows,
        )

    def _embeddings(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        n = batch.num_rows
        bad = np.full(n, None, dtype=object)
        if len(self.emb_cols) > 1:
            if self.dim is None:
                self.dim = len(self.emb_cols)
            if len(self.emb_cols) != self.dim:
                bad[:] = f"embedding has {len(self.emb_cols)} columns, store dimension is {self.dim}"
                return np.zeros((n, self.dim), np.float32), bad
            emb = np.empty((n, self.dim), np.float32)
            for j, c in enumerate(self.emb_cols):
                emb[:, j] = float_column(batch.column(c))
            return emb, bad
        col = batch.column(self.emb_cols[0])
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        t = col.type
        if pa.types.is_fixed_size_list(t):
            d = t.list_size
            if self.dim is None:
                self.dim = d
            if d != self.dim:
                bad[:] = f"embedding has {d} values, store dimension is {self.dim}"
                return np.zeros((n, self.dim), np.float32), bad
            values = col.values.slice(col.offset * d, n * d)
            emb = _float_values(values).reshape(n, d)
            if col.null_count:
                bad[np.asarray(col.is_null())] = "missing embedding"
            return emb, bad
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            lengths = np.nan_to_num(np.asarray(lengths, dtype=np.float64), nan=-1).astype(np.int64)
            if self.dim is None:  # a new store: the most common length, robust to a few ragged rows
                good = lengths[lengths > 0]
                if not len(good):
                    bad[:] = "missing embedding"
                    return np.zeros((n, 1), np.float32), bad
                values, counts = np.unique(good, return_counts=True)
                self.dim = int(values[np.argmax(counts)])
            null = lengths < 0
            wrong = ~null & (lengths != self.dim)
            bad[null] = "missing embedding"
            if wrong.any():
                bad[wrong] = [
                    f"embedding has {k} values, store dimension is {self.dim}" for k in lengths[wrong]
                ]
            ok = ~null & ~wrong
            emb = np.zeros((n, self.dim), np.float32)
            if ok.all():
                emb = _float_values(pc.list_flatten(col)).reshape(n, self.dim)
            elif ok.any():
                emb[ok] = _float_values(pc.list_flatten(col.filter(pa.array(ok)))).reshape(-1, self.dim)
            return emb, bad
        raise InputError(f"column {self.emb_cols[0]!r} has type {t}, not a list of numbers")


def _why(e: BaseException) -> str:
    """One line: Arrow's messages can hold newlines (thrift errors), which would garble a failures table."""
    text = " ".join(str(e).split())
    return (
        text.split(": ", 1)[-1]
        if isinstance(e, InputError)
        else f"unreadable Parquet data ({type(e).__name__}: {text})"
    )


def _empty_chunk(failure: Failure, lost_rows: int | None = 1) -> Chunk:
    """A chunk with no rows that carries the failure of an unreadable region and how many rows it held."""
    return Chunk(
        ids=pa.array([], pa.string()),
        lat=np.empty(0),
        lon=np.empty(0),
        emb=np.empty((0, 1), np.float32),
        bad=np.empty(0, object),
        labels={},
        split=None,
        where=lambda idx: [],
        failures=[failure],
        lost_rows=lost_rows,
    )


def _float_values(values: pa.Array) -> np.ndarray:
    """Flat numeric Arrow values → numpy float (float16/32/64 kept; ints → float32; nulls → NaN)."""
    if not pa.types.is_floating(values.type):
        values = pc.cast(values, pa.float32())
    if values.null_count:
        return values.to_numpy(zero_copy_only=False).astype(np.float32)
    return values.to_numpy(zero_copy_only=False)
