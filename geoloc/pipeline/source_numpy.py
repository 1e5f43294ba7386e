"""A NumPy ``.npy`` of embeddings plus a CSV/Parquet of id / lat / lon as an import source (row i ↔ row i).

The ``.npy`` is memory-mapped and copied one chunk at a time, so a 5M × 768 array never sits in memory.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from geoloc.config import ImportConfig
from geoloc.errors import InputError
from geoloc.pipeline.source_common import Chunk, ParquetLike, expand_source, open_parquet

__all__ = ["NumpySource"]


class NumpySource(ParquetLike):
    """An ``(N, D)`` ``.npy`` (memory-mapped) plus a CSV/Parquet of id / lat / lon; row i ↔ embedding i."""

    kind = "numpy"

    def __init__(self, cfg: ImportConfig) -> None:
        self.cfg = cfg
        files = expand_source(cfg.source, (".npy",))
        if len(files) != 1:
            raise InputError(f"{cfg.source}: a NumPy source is one .npy file (found {len(files)})")
        self.npy = files[0]
        self.meta = Path(cfg.metadata) if cfg.metadata else self._find_metadata(self.npy)
        if not self.meta.is_file():
            raise InputError(f"{self.meta}: metadata file not found; pass --metadata FILE.csv|.parquet")
        try:
            self.emb = np.load(self.npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise InputError(f"{self.npy}: corrupt or truncated .npy ({e}); re-export the embeddings") from e
        if self.emb.ndim != 2 or not np.issubdtype(self.emb.dtype, np.number):
            raise InputError(
                f"{self.npy}: expected a 2-D (N, D) numeric array, got {self.emb.dtype} {self.emb.shape}"
            )
        self.dim: int | None = None
        self.files = [self.npy, self.meta]
        self.is_csv = self.meta.suffix.lower() in (".csv", ".tsv", ".txt")
        names = self._csv_header() if self.is_csv else open_parquet(self.meta).schema_arrow.names
        self._columns(names, str(self.meta), with_emb=False)
        self.total = self._count_rows()
        if self.total != self.emb.shape[0]:
            raise InputError(
                f"{self.npy} has {self.emb.shape[0]} rows but {self.meta} has {self.total}; "
                "row i of each must describe the same item"
            )

    @staticmethod
    def _find_metadata(npy: Path) -> Path:
        stem = npy.name[: -len(".npy")]
        for cand in (
            f"{stem}.parquet",
            f"{stem}.csv",
            f"{stem}.meta.parquet",
            f"{stem}.meta.csv",
            "metadata.parquet",
            "metadata.csv",
        ):
            if (npy.parent / cand).is_file():
                return npy.parent / cand
        raise InputError(f"{npy}: no metadata next to it ({stem}.parquet/.csv); pass --metadata FILE")

    def _csv_header(self) -> list[str]:
        with open(self.meta, newline="", encoding="utf-8") as f:
            return next(csv.reader(f, delimiter="\t" if self.meta.suffix == ".tsv" else ","), [])

    def _csv_reader(self, columns: list[str]) -> pa.RecordBatchReader:
        types = {c: pa.string() for c in columns if c not in (self.lat_col, self.lon_col)}
        types.update({self.lat_col: pa.string(), self.lon_col: pa.string()})
        return pacsv.open_csv(
            self.meta,
            read_options=pacsv.ReadOptions(block_size=1 << 23),
            parse_options=pacsv.ParseOptions(delimiter="\t" if self.meta.suffix == ".tsv" else ","),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns, column_types=types, strings_can_be_null=True
            ),
        )

    def _count_rows(self) -> int:
        if not self.is_csv:
            return open_parquet(self.meta).metadata.num_rows
        return sum(b.num_rows for b in self._csv_reader([self.id_col]))

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if self.is_csv:
            for b in self._csv_reader(self.read_cols):
                for start in range(0, b.num_rows, self.cfg.chunk_rows):
                    yield b.slice(start, self.cfg.chunk_rows)
        else:
            yield from open_parquet(self.meta).iter_batches(
                batch_size=self.cfg.chunk_rows, columns=self.read_cols
            )

    def chunks(self) -> Iterator[Chunk]:
        d = int(self.emb.shape[1])
        if self.dim is None:
            self.dim = d
        offset = 0
        for batch in self._batches():
            n = batch.num_rows
            bad = np.full(n, None, dtype=object)
            if self._all_known(batch.column(self.id_col)):
                yield self._stored_chunk(batch.column(self.id_col), self.meta, offset)
                offset += n
                continue
            if d != self.dim:
                bad[:] = f"embedding has {d} values, store dimension is {self.dim}"
                emb = np.zeros((n, self.dim), np.float32)
            else:
                emb = np.asarray(self.emb[offset : offset + n])  # copies just this chunk from the mmap
            yield self._chunk(batch, emb, bad, self.meta, offset)
            offset += n
