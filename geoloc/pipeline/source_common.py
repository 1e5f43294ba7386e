"""What every import source shares: the :class:`Chunk` readers hand to the importer, and column handling.

The importer (:mod:`geoloc.pipeline.importers`) reads one of three source kinds, one module each —
:mod:`~geoloc.pipeline.source_parquet`, :mod:`~geoloc.pipeline.source_numpy`,
:mod:`~geoloc.pipeline.source_wds`. They meet here: the chunk type, source path expansion, id / lat / lon /
embedding column detection (:class:`ParquetLike`, shared by Parquet features and a NumPy pair's metadata) and
the Arrow → numpy conversions that turn unparsable values into NaN (which then become failures).
"""

from __future__ import annotations

import fnmatch
import glob
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geoloc.config import ImportConfig
from geoloc.errors import InputError
from geoloc.pipeline.items import Failure
from geoloc.pipeline.store import IdIndex

__all__ = [
    "EMB_NAMES",
    "ID_NAMES",
    "LAT_NAMES",
    "LON_NAMES",
    "Chunk",
    "ParquetLike",
    "expand_source",
    "float_column",
    "label_names",
    "open_parquet",
    "string_column",
]

ID_NAMES = ("id", "__key__", "key", "image_id")
LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "lng", "longitude")
EMB_NAMES = ("emb", "embedding", "embeddings", "features", "vector")


@dataclass
class Chunk:
    """Up to ``chunk_rows`` source rows, as columns; what readers hand to the importer.

    ``emb`` is (n, dim) in any float dtype; rows whose ``bad`` entry is a string were already found unusable
    by the reader (missing or ragged embedding) and hold placeholders. ``where(rows)`` names rows for failure
    records (``file:row 12``, ``shard.tar:000123``); ``failures`` are problems that have no row (a corrupt
    tar).
    """

    ids: pa.Array
    lat: np.ndarray
    lon: np.ndarray
    emb: np.ndarray
    bad: np.ndarray
    labels: dict[str, pa.Array]
    split: pa.Array | None
    where: Callable[[np.ndarray], list[str]]
    failures: list[Failure] = field(default_factory=list)
    # Source rows that ``failures`` stand for (an unreadable row group or file): counted as failed rows so
    # the failure rate is honest; ``None`` when unknown (a file whose metadata cannot be read: ≥1 row).
    lost_rows: int | None = 0

    def __len__(self) -> int:
        return len(self.ids)


def expand_source(source: str, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, a directory (its files with one of ``suffixes``, sorted) or a glob pattern."""
    p = Path(source)
    if any(ch in source for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(source, recursive=True) if Path(f).is_file())
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"{source}: no such file, directory or glob match; check the SOURCE path")
    if not files:
        raise InputError(f"{source}: no {'/'.join(suffixes)} files found")
    return files


def _pick(names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"{where}: no {what} column {wanted!r} (columns: {', '.join(list(names)[:20])})")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise InputError(f"{where}: no {what} column (tried {', '.join(candidates)}); name it with --{what}-col")


def label_names(names: Sequence[str], extra: Sequence[str]) -> list[str]:
    out = [n for n in names if n.startswith("unique_")]
    return out + [x for x in extra if x not in out]


def float_column(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric/str column → float64 numpy, nulls and unparsable values as NaN."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = _parse_floats(col)
    return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _parse_floats(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    try:
        return pc.cast(col, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Some strings are not numbers: keep the numeric ones, NaN for the rest (they become failures).
        ok = pc.match_substring_regex(col, r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
        return pc.cast(pc.if_else(ok, col, pa.scalar(None, pa.string())), pa.float64())


def string_column(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    col = pc.cast(col, pa.string()) if not pa.types.is_string(col.type) else col
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


class ParquetLike:
    """Shared column handling for Parquet features and the metadata half of a NumPy pair."""

    cfg: ImportConfig
    dim: int | None
    kind: str

    def _columns(self, names: Sequence[str], where: str, with_emb: bool) -> None:
        cfg = self.cfg
        self.id_col = _pick(names, cfg.id_col, ID_NAMES, "id", where)
        self.lat_col = _pick(names, cfg.lat_col, LAT_NAMES, "lat", where)
        self.lon_col = _pick(names, cfg.lon_col, LON_NAMES, "lon", where)
        self.split_col = "split" if cfg.split is None and "split" in names else None
        missing = [x for x in cfg.labels if x not in names]
        if missing:
            raise InputError(
                f"{where}: label column(s) {missing} not found (columns: {', '.join(names[:20])})"
            )
        self.label_candidates = label_names(names, cfg.labels)
        self.emb_cols: list[str] = []
        if with_emb:
            if cfg.emb_col is not None and any(ch in cfg.emb_col for ch in "*?["):
                self.emb_cols = sorted(fnmatch.filter(names, cfg.emb_col), key=_natural_key)
                if not self.emb_cols:
                    raise InputError(f"{where}: no columns match --emb-col {cfg.emb_col!r}")
            else:
                self.emb_cols = [_pick(names, cfg.emb_col, EMB_NAMES, "emb", where)]
        used = {self.id_col, self.lat_col, self.lon_col, *self.emb_cols, *self.label_candidates}
        self.read_cols = [n for n in names if n in used or n == self.split_col]

    skip_index: IdIndex | None = None

    def _all_known(self, ids: pa.Array | pa.ChunkedArray) -> bool:
        """True when every id of this block is already in the store: its embeddings need not be decoded."""
        return (
            self.skip_index is not None
            and len(ids) > 0
            and bool(self.skip_index.contains(string_column(ids)).all())
        )

    def _stored_chunk(self, ids: pa.Array | pa.ChunkedArray, path: Path, offset: int) -> Chunk:
        """A block whose ids are all stored: only the ids matter (they are skipped, or are duplicates), so
        coordinates and embeddings are placeholders (a zero-stride view, no memory)."""
        n = len(ids)

        def where(rows: np.ndarray, _p: str = str(path), _o: int = offset) -> list[str]:
            return [f"{_p}:row {_o + int(i)}" for i in rows]

        return Chunk(
            ids=string_column(ids),
            lat=np.zeros(n),
            lon=np.zeros(n),
            emb=np.broadcast_to(np.zeros((1, 1), np.float32), (n, self.dim or 1)),
            bad=np.full(n, None, dtype=object),
            labels={},
            split=None,
            where=where,
        )

    def _chunk(
        self, batch: pa.RecordBatch | pa.Table, emb: np.ndarray, bad: np.ndarray, path: Path, offset: int
    ) -> Chunk:
        cols = {name: batch.column(name) for name in batch.schema.names}

        def where(rows: np.ndarray, _p: str = str(path), _o: int = offset) -> list[str]:
            return [f"{_p}:row {_o + int(i)}" for i in rows]

        return Chunk(
            ids=string_column(cols[self.id_col]),
            lat=float_column(cols[self.lat_col]),
            lon=float_column(cols[self.lon_col]),
            emb=emb,
            bad=bad,
            labels={c: string_column(cols[c]) for c in self.label_candidates},
            split=string_column(cols[self.split_col]) if self.split_col else None,
            where=where,
        )


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        # A buffered stream decodes pages incrementally: memory stays bounded even with huge row groups.
        return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: unreadable Parquet file ({e})") from e
