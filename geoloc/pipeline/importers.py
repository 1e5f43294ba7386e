"""Bring existing embeddings into the feature store: webdataset tars, Parquet files, NumPy + metadata pairs.

Many users already hold features (the OSV-5M webdataset ships a StreetCLIP ``.npy`` per image); re-embedding
millions of images would waste days of GPU. An import writes exactly what ``geoloc embed`` writes — same
shard schema, manifest, checksums, incremental rules — so every later command cannot tell the difference.

How it stays fast and small:
- Every reader yields :class:`Chunk` s of at most ``chunk_rows`` rows (Parquet ``iter_batches`` with a
  buffered stream, CSV ``open_csv``, a memory-mapped ``.npy``, a streamed tar), so memory is bounded by a few
  chunks whatever the source size.
- Checks are numpy masks over the whole chunk (ids, duplicates, coordinates, NaN/inf, float16 overflow);
  only the tar reader loops per sample, because a tar *is* a sequence of samples.
- Ids are tracked as 128-bit hashes (:class:`~geoloc.pipeline.store.IdIndex`), 16 bytes per id, so a
  5M-row re-import compares against the store without a 500 MB Python set.

Bad rows (dimension mismatch, NaN/inf, out-of-range coordinates, duplicate or missing ids, unreadable tar
members, corrupt ``.npy``) become rows of the store's failures table with a reason; an import never stops for
them. Re-importing a source adds nothing: its good rows are skipped as existing, and failures already
recorded for the same (id, source, reason) are not recorded twice.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import glob
import hashlib
import io
import json
import math
import queue
import re
import sys
import tarfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geoloc.config import ImportConfig
from geoloc.errors import InputError, StoreError
from geoloc.pipeline.items import Failure
from geoloc.pipeline.store import (
    FAILURE_SCHEMA,
    BackboneInfo,
    FeatureStore,
    IdIndex,
    build_table,
    finite_rows_f16,
    hash_ids,
)

__all__ = ["Chunk", "ImportConfig", "ImportReport", "import_embeddings", "open_source"]

ID_NAMES = ("id", "__key__", "key", "image_id")
LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "lng", "longitude")
EMB_NAMES = ("emb", "embedding", "embeddings", "features", "vector")
FP16_MAX = 65504.0


@dataclass
class ImportReport:
    """What an import did; ``failed`` counts rows (and unreadable tar parts) recorded as failures."""

    store: str
    source: str
    kind: str
    backbone: str = ""
    dim: int = 0
    label_columns: tuple[str, ...] = ()
    rows_read: int = 0
    imported: int = 0
    skipped_existing: int = 0
    failed: int = 0
    failures_recorded: int = 0
    shards_written: int = 0
    reasons: Counter = field(default_factory=Counter)
    ignored_labels: tuple[str, ...] = ()
    max_failure_rate: float = 0.05

    @property
    def failure_rate(self) -> float:
        return self.failed / max(1, self.rows_read)

    @property
    def ok(self) -> bool:
        return self.failure_rate <= self.max_failure_rate

    def summary(self) -> str:
        lines = [
            f"{self.source} ({self.kind}) → {self.store} [{self.backbone}, dim {self.dim}]",
            f"  imported {self.imported}, skipped (already in store) {self.skipped_existing}, "
            f"failed {self.failed} ({self.failure_rate:.2%}; limit {self.max_failure_rate:.2%}), "
            f"{self.shards_written} shard(s) written",
        ]
        lines += [f"  failure: {r} × {k}" for r, k in self.reasons.most_common(10)]
        if self.ignored_labels:
            lines.append(f"  note: label(s) {list(self.ignored_labels)} are not columns of this store; not kept")
        return "\n".join(lines)


@dataclass
class Chunk:
    """Up to ``chunk_rows`` source rows, as columns; what readers hand to the importer.

    ``emb`` is (n, dim) in any float dtype; rows whose ``bad`` entry is a string were already found unusable
    by the reader (missing or ragged embedding) and hold placeholders. ``where(rows)`` names rows for failure
    records (``file:row 12``, ``shard.tar:000123``); ``failures`` are problems that have no row (a corrupt tar).
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

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------- sources
def _expand(source: str, suffixes: tuple[str, ...]) -> list[Path]:
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


def _detect_kind(source: str) -> str:
    p = Path(source)
    names = [source] if not p.is_dir() else [f.name for f in p.rglob("*") if f.is_file()]
    if any(ch in source for ch in "*?["):
        names = glob.glob(source, recursive=True)
    exts = {("tar" if n.lower().endswith(".tar.gz") else n.rsplit(".", 1)[-1].lower()) for n in names if "." in n}
    for kind, ext in (("wds", {"tar", "tgz"}), ("parquet", {"parquet", "pq"}), ("numpy", {"npy"})):
        if exts & ext:
            return kind
    raise InputError(f"{source}: cannot tell the source kind (expected .tar, .parquet or .npy); pass --kind")


def _pick(names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"{where}: no {what} column {wanted!r} (columns: {', '.join(list(names)[:20])})")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise InputError(f"{where}: no {what} column (tried {', '.join(candidates)}); name it with --{what}-col")


def _label_names(names: Sequence[str], extra: Sequence[str]) -> list[str]:
    out = [n for n in names if n.startswith("unique_")]
    return out + [x for x in extra if x not in out]


def _floats(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
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


def _strings(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    col = pc.cast(col, pa.string()) if not pa.types.is_string(col.type) else col
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


class _ParquetLike:
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
            raise InputError(f"{where}: label column(s) {missing} not found (columns: {', '.join(names[:20])})")
        self.label_candidates = _label_names(names, cfg.labels)
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
        return self.skip_index is not None and len(ids) > 0 and bool(self.skip_index.contains(_strings(ids)).all())

    def _stored_chunk(self, ids: pa.Array | pa.ChunkedArray, path: Path, offset: int) -> Chunk:
        """A block whose ids are all stored: only the ids matter (they are skipped, or are duplicates), so
        coordinates and embeddings are placeholders (a zero-stride view, no memory)."""
        n = len(ids)

        def where(rows: np.ndarray, _p: str = str(path), _o: int = offset) -> list[str]:
            return [f"{_p}:row {_o + int(i)}" for i in rows]

        return Chunk(ids=_strings(ids), lat=np.zeros(n), lon=np.zeros(n),
                     emb=np.broadcast_to(np.zeros((1, 1), np.float32), (n, self.dim or 1)),
                     bad=np.full(n, None, dtype=object), labels={}, split=None, where=where)

    def _chunk(self, batch: pa.RecordBatch | pa.Table, emb: np.ndarray, bad: np.ndarray, path: Path,
               offset: int) -> Chunk:
        cols = {name: batch.column(name) for name in batch.schema.names}

        def where(rows: np.ndarray, _p: str = str(path), _o: int = offset) -> list[str]:
            return [f"{_p}:row {_o + int(i)}" for i in rows]

        return Chunk(
            ids=_strings(cols[self.id_col]),
            lat=_floats(cols[self.lat_col]),
            lon=_floats(cols[self.lon_col]),
            emb=emb,
            bad=bad,
            labels={c: _strings(cols[c]) for c in self.label_candidates},
            split=_strings(cols[self.split_col]) if self.split_col else None,
            where=where,
        )


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        # A buffered stream decodes pages incrementally: memory stays bounded even with huge row groups.
        return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: unreadable Parquet file ({e})") from e


class ParquetSource(_ParquetLike):
    """Parquet files with id / lat / lon and an embedding column (fixed-size list, list, or one per dim)."""

    kind = "parquet"

    def __init__(self, cfg: ImportConfig) -> None:
        self.cfg = cfg
        self.files = _expand(cfg.source, (".parquet", ".pq"))
        self.dim: int | None = None
        first = _open_parquet(self.files[0])
        schema = first.schema_arrow
        self._columns(schema.names, str(self.files[0]), with_emb=True)
        for c in self.emb_cols:
            t = schema.field(c).type
            inner = t.value_type if (pa.types.is_list(t) or pa.types.is_large_list(t)
                                     or pa.types.is_fixed_size_list(t)) else t
            numeric = pa.types.is_floating(inner) or pa.types.is_integer(inner)
            if not numeric or (len(self.emb_cols) > 1 and inner is not t):
                raise InputError(f"{self.files[0]}: column {c!r} has type {t}; expected a list of numbers, or "
                                 "--emb-col 'prefix_*' naming one numeric column per dimension")
        self.total = 0
        for f in self.files:
            with contextlib.suppress(InputError):  # an unreadable file is reported when it is reached
                self.total += _open_parquet(f).metadata.num_rows

    def chunks(self) -> Iterator[Chunk]:
        for path in self.files:
            offset = 0
            try:
                pf = _open_parquet(path)
                absent = [c for c in self.read_cols if c not in pf.schema_arrow.names]
                if absent:
                    raise InputError(f"missing column(s) {absent} that {self.files[0].name} has")
                for rg in range(pf.num_row_groups):
                    ids = pf.read_row_group(rg, columns=[self.id_col]).column(0)
                    if self._all_known(ids):
                        yield self._stored_chunk(ids, path, offset)
                        offset += len(ids)
                        continue
                    for batch in pf.iter_batches(batch_size=self.cfg.chunk_rows, row_groups=[rg],
                                                 columns=self.read_cols, use_threads=True):
                        emb, bad = self._embeddings(batch)
                        yield self._chunk(batch, emb, bad, path, offset)
                        offset += batch.num_rows
            except (InputError, OSError, pa.ArrowException) as e:
                # One bad file of many: record it and go on with the next file.
                what = (str(e).split(": ", 1)[-1] if isinstance(e, InputError)
                        else f"unreadable Parquet data ({type(e).__name__}: {e})")
                yield _empty_chunk(Failure(id="", source=f"{path}:row {offset}", split=self.cfg.split or "",
                                           reason=f"{what}; rest of file skipped"))

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
                emb[:, j] = _floats(batch.column(c))
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
                bad[wrong] = [f"embedding has {k} values, store dimension is {self.dim}" for k in lengths[wrong]]
            ok = ~null & ~wrong
            emb = np.zeros((n, self.dim), np.float32)
            if ok.all():
                emb = _float_values(pc.list_flatten(col)).reshape(n, self.dim)
            elif ok.any():
                emb[ok] = _float_values(pc.list_flatten(col.filter(pa.array(ok)))).reshape(-1, self.dim)
            return emb, bad
        raise InputError(f"column {self.emb_cols[0]!r} has type {t}, not a list of numbers")


def _empty_chunk(failure: Failure) -> Chunk:
    """A chunk with no rows that only carries a failure without a row (an unreadable file)."""
    return Chunk(ids=pa.array([], pa.string()), lat=np.empty(0), lon=np.empty(0), emb=np.empty((0, 1), np.float32),
                 bad=np.empty(0, object), labels={}, split=None, where=lambda idx: [], failures=[failure])


def _float_values(values: pa.Array) -> np.ndarray:
    """Flat numeric Arrow values → numpy float (float16/32/64 kept; ints → float32; nulls → NaN)."""
    if not pa.types.is_floating(values.type):
        values = pc.cast(values, pa.float32())
    if values.null_count:
        return values.to_numpy(zero_copy_only=False).astype(np.float32)
    return values.to_numpy(zero_copy_only=False)


class NumpySource(_ParquetLike):
    """An ``(N, D)`` ``.npy`` (memory-mapped) plus a CSV/Parquet of id / lat / lon; row i ↔ embedding i."""

    kind = "numpy"

    def __init__(self, cfg: ImportConfig) -> None:
        self.cfg = cfg
        files = _expand(cfg.source, (".npy",))
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
            raise InputError(f"{self.npy}: expected a 2-D (N, D) numeric array, got {self.emb.dtype} "
                             f"{self.emb.shape}")
        self.dim: int | None = None
        self.files = [self.npy, self.meta]
        self.is_csv = self.meta.suffix.lower() in (".csv", ".tsv", ".txt")
        names = self._csv_header() if self.is_csv else _open_parquet(self.meta).schema_arrow.names
        self._columns(names, str(self.meta), with_emb=False)
        self.total = self._count_rows()
        if self.total != self.emb.shape[0]:
            raise InputError(f"{self.npy} has {self.emb.shape[0]} rows but {self.meta} has {self.total}; "
                             "row i of each must describe the same item")

    @staticmethod
    def _find_metadata(npy: Path) -> Path:
        stem = npy.name[: -len(".npy")]
        for cand in (f"{stem}.parquet", f"{stem}.csv", f"{stem}.meta.parquet", f"{stem}.meta.csv",
                     "metadata.parquet", "metadata.csv"):
            if (npy.parent / cand).is_file():
                return npy.parent / cand
        raise InputError(f"{npy}: no metadata next to it ({stem}.parquet/.csv); pass --metadata FILE")

    def _csv_header(self) -> list[str]:
        with open(self.meta, newline="", encoding="utf-8") as f:
            return next(csv.reader(f, delimiter="\t" if self.meta.suffix == ".tsv" else ","), [])

    def _csv_reader(self, columns: list[str]) -> pa.RecordBatchReader:
        import pyarrow.csv as pacsv

        types = {c: pa.string() for c in columns if c not in (self.lat_col, self.lon_col)}
        types.update({self.lat_col: pa.string(), self.lon_col: pa.string()})
        return pacsv.open_csv(
            self.meta,
            read_options=pacsv.ReadOptions(block_size=1 << 23),
            parse_options=pacsv.ParseOptions(delimiter="\t" if self.meta.suffix == ".tsv" else ","),
            convert_options=pacsv.ConvertOptions(include_columns=columns, column_types=types,
                                                 strings_can_be_null=True),
        )

    def _count_rows(self) -> int:
        if not self.is_csv:
            return _open_parquet(self.meta).metadata.num_rows
        return sum(b.num_rows for b in self._csv_reader([self.id_col]))

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if self.is_csv:
            for b in self._csv_reader(self.read_cols):
                for start in range(0, b.num_rows, self.cfg.chunk_rows):
                    yield b.slice(start, self.cfg.chunk_rows)
        else:
            yield from _open_parquet(self.meta).iter_batches(batch_size=self.cfg.chunk_rows,
                                                             columns=self.read_cols)

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
                emb = np.asarray(self.emb[offset: offset + n])  # copies just this chunk from the mmap
            yield self._chunk(batch, emb, bad, self.meta, offset)
            offset += n


class WdsSource:
    """Webdataset tar shards: per sample an embedding ``.npy`` member, a ``.json`` and optionally a ``.cls``.

    Samples are consecutive members sharing a key (member path up to the first dot of its basename). The id
    is the JSON ``id`` (or ``--id-col`` key) when present, else the key's basename. Coordinates come from
    ``latitude``/``longitude`` (or ``lat``/``lon``); every ``unique_*`` key is kept as a label, ``.cls`` as
    the ``cls`` label. Tars are streamed (``r|*``), never extracted or held whole in memory.
    """

    kind = "wds"
    skip_index: IdIndex | None = None  # unused: a tar stream has to be read through anyway

    def __init__(self, cfg: ImportConfig) -> None:
        self.cfg = cfg
        self.files = _expand(cfg.source, (".tar", ".tgz", ".tar.gz"))
        self.dim: int | None = None
        self.total: int | None = None
        self.emb_ext = cfg.emb_key if cfg.emb_key.endswith(".npy") else f"{cfg.emb_key}.npy"
        self.label_candidates: list[str] = []
        self._labels_fixed = False

    def chunks(self) -> Iterator[Chunk]:
        buf = _SampleBuffer(self)
        for path in self.files:
            for _ in self._samples(path, buf):
                if len(buf) >= self.cfg.chunk_rows:
                    yield buf.flush()
        if len(buf) or buf.failures:
            yield buf.flush()

    def _samples(self, path: Path, buf: _SampleBuffer) -> Iterator[None]:
        current: str | None = None
        members: dict[str, bytes] = {}
        last = "(start)"
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name
                    base = name.rsplit("/", 1)[-1]
                    if base.startswith(".") or "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{name[: len(name) - len(base)]}{stem}"
                    if key != current:
                        if current is not None:
                            buf.add(path, current, members)
                            yield
                        current, members = key, {}
                    if ext in (self.emb_ext, "json", "cls"):
                        f = tar.extractfile(member)
                        members[ext] = f.read() if f is not None else b""
                    else:  # images and other embeddings: skipped, only named in error messages
                        members[f"_other:{ext}"] = b""
                    last = name
                end = tar.offset
            if not _ends_cleanly(path, end):
                raise tarfile.ReadError("file ends inside a member header (truncated tar)")
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            if current is not None:
                buf.add(path, current, members, truncated=f"tar ended inside this sample ({e})")
                current = None
            buf.failures.append(Failure(id="", source=f"{path}: after {last}", split=self.cfg.split or "",
                                        reason=f"unreadable tar data ({type(e).__name__}: {e}); rest of shard skipped"))
        if current is not None:
            buf.add(path, current, members)
            yield


def _ends_cleanly(path: Path, offset: int) -> bool:
    """An uncompressed tar must end with a zero block where the last member ends; ``tarfile`` treats a
    header cut short as a normal end of archive, so without this check a truncated shard would pass silently.
    Compressed tars need no check: their decompressor raises on a truncated stream."""
    with open(path, "rb") as f:
        if f.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7"):
            return True
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and not block.strip(b"\0")


class _SampleBuffer:
    """Collects parsed samples of a tar source until a chunk is full (the only per-row Python path)."""

    def __init__(self, src: WdsSource) -> None:
        self.src = src
        self.failures: list[Failure] = []
        self._reset()

    def _reset(self) -> None:
        self.ids: list[str | None] = []
        self.lat: list[float] = []
        self.lon: list[float] = []
        self.embs: list[np.ndarray | None] = []
        self.bad: list[str | None] = []
        self.labels: list[dict[str, str | None]] = []
        self.splits: list[str | None] = []
        self.where: list[str] = []
        self.lengths: Counter = Counter()  # embedding lengths seen (also in otherwise bad samples)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, path: Path, key: str, members: dict[str, bytes], truncated: str | None = None) -> None:
        src, cfg = self.src, self.src.cfg
        reason: str | None = truncated
        meta: dict = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                meta, reason = {}, reason or f"unreadable .json member ({e})"
        elif reason is None:
            reason = "no .json metadata member"
        emb = None
        if src.emb_ext in members:
            try:
                arr = _load_npy(members[src.emb_ext])
                if not np.issubdtype(arr.dtype, np.number) or arr.ndim == 0:
                    raise ValueError(f"{arr.dtype} array of shape {arr.shape}")
                emb = arr.reshape(-1) if arr.ndim == 1 or arr.shape[0] == 1 else None
                if emb is None:
                    raise ValueError(f"shape {arr.shape} is not one vector")
            except (ValueError, OSError, EOFError) as e:
                reason = reason or f"unreadable {src.emb_ext} member ({e})"
        elif reason is None:
            have = sorted(k.split(":", 1)[-1] for k in members)
            reason = f"no {src.emb_ext} member (sample has: {', '.join(have) or 'nothing'})"
        if emb is not None and src.dim is not None and emb.shape[0] != src.dim:
            reason = f"embedding has {emb.shape[0]} values, store dimension is {src.dim}"
        id_key = cfg.id_col or "id"
        sid = meta.get(id_key)
        self.ids.append(str(sid) if sid not in (None, "") else key.rsplit("/", 1)[-1])
        self.lat.append(_num(meta, cfg.lat_col, LAT_NAMES))
        self.lon.append(_num(meta, cfg.lon_col, LON_NAMES))
        self.embs.append(emb if reason is None else None)
        if emb is not None:
            self.lengths[emb.shape[0]] += 1
        self.bad.append(reason)
        labels = {k: _label(v) for k, v in meta.items() if k.startswith("unique_") or k in cfg.labels}
        if "cls" in members:
            labels["cls"] = members["cls"].decode("utf-8", "replace").strip()
        self.labels.append(labels)
        self.splits.append(str(meta["split"]) if cfg.split is None and meta.get("split") else None)
        self.where.append(f"{path}:{key}")

    def flush(self) -> Chunk:
        src = self.src
        n = len(self.ids)
        if not src._labels_fixed:
            seen: dict[str, None] = {}
            for lab in self.labels:
                seen.update(dict.fromkeys(lab))
            src.label_candidates = _label_names(list(seen), src.cfg.labels)
            if "cls" in seen and "cls" not in src.label_candidates:
                src.label_candidates.append("cls")
            src._labels_fixed = True
        if src.dim is None:  # a new store: the most common length in the first chunk, not the first row's
            src.dim = self.lengths.most_common(1)[0][0] if self.lengths else None
            for i, e in enumerate(self.embs):
                if e is not None and e.shape[0] != src.dim:
                    self.bad[i] = f"embedding has {e.shape[0]} values, store dimension is {src.dim}"
                    self.embs[i] = None
        dim = src.dim or 1
        emb = np.zeros((n, dim), np.float32)
        rows = [i for i, e in enumerate(self.embs) if e is not None]
        if rows:
            emb[rows] = np.stack([self.embs[i] for i in rows]).astype(np.float32, copy=False)
        bad = np.empty(n, dtype=object)
        bad[:] = self.bad
        where = self.where
        chunk = Chunk(
            ids=pa.array(self.ids, type=pa.string()),
            lat=np.asarray(self.lat, np.float64),
            lon=np.asarray(self.lon, np.float64),
            emb=emb,
            bad=bad,
            labels={c: pa.array([lab.get(c) for lab in self.labels], type=pa.string())
                    for c in src.label_candidates},
            split=(pa.array(self.splits, type=pa.string()) if any(s is not None for s in self.splits)
                   else None),
            where=lambda idx, _w=where: [_w[int(i)] for i in idx],
            failures=self.failures,
        )
        self.failures = []
        self._reset()
        return chunk


_NPY_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def _load_npy(raw: bytes) -> np.ndarray:
    """``np.load`` for one small ``.npy`` member, with its header parse cached by the header bytes.

    Every sample of a shard has the same header (dtype, shape), and ``np.load`` spends most of its time
    evaluating that header; after the first sample, a member is a ``frombuffer`` plus a length check.
    """
    if raw[:6] == b"\x93NUMPY" and len(raw) >= 10 and raw[6] in (1, 2, 3):
        start = 10 if raw[6] == 1 else 12
        end = start + int.from_bytes(raw[8:start], "little")
        layout = _NPY_LAYOUTS.get(raw[start:end])
        if layout is not None:
            dtype, shape = layout
            count = math.prod(shape)
            if len(raw) - end != count * dtype.itemsize:
                raise ValueError(f"{len(raw) - end} data bytes, expected {count * dtype.itemsize} (truncated?)")
            return np.frombuffer(raw, dtype=dtype, count=count, offset=end).reshape(shape)
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        if arr.dtype.kind in "fiu" and (arr.flags.c_contiguous or arr.ndim <= 1) and len(_NPY_LAYOUTS) < 64:
            _NPY_LAYOUTS[raw[start:end]] = (arr.dtype, arr.shape)
        return arr
    return np.load(io.BytesIO(raw), allow_pickle=False)


def _num(meta: dict, key: str | None, names: Sequence[str]) -> float:
    for k in (key,) if key else names:
        if k in meta:
            try:
                return float(meta[k])
            except (TypeError, ValueError):
                return math.nan
    return math.nan


def _label(v: object) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v if isinstance(v, str) else str(v)


Source = ParquetSource | NumpySource | WdsSource


def open_source(cfg: ImportConfig) -> Source:
    """Pick the reader for ``cfg.source`` (by ``cfg.kind`` or by file extension)."""
    kind = cfg.kind if cfg.kind != "auto" else _detect_kind(cfg.source)
    if kind == "wds":
        return WdsSource(cfg)
    if kind == "parquet":
        return ParquetSource(cfg)
    if kind == "numpy":
        return NumpySource(cfg)
    raise InputError(f"unknown source kind {kind!r}; choose auto, wds, parquet or numpy")


def _fingerprint(src: Source, cfg: ImportConfig) -> str:
    h = hashlib.sha256()
    for f in src.files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([cfg.emb_col, cfg.emb_key, cfg.id_col, cfg.lat_col, cfg.lon_col]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- import
def _failure_keys(ids: pa.Array, sources: pa.Array, reasons: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    joined = pc.binary_join_element_wise(pc.fill_null(ids, ""), pc.fill_null(sources, ""),
                                         pc.fill_null(reasons, ""), "\x00")
    return hash_ids(joined)


class _Importer:
    """The per-chunk bookkeeping of one import: id indices, pending shard rows, pending failures."""

    def __init__(self, cfg: ImportConfig, src: Source, report: ImportReport, task: str) -> None:
        self.cfg, self.src, self.report, self.task = cfg, src, report, task
        self.store: FeatureStore | None = None
        self.known = IdIndex()      # ids in the store when the import started (read-only afterwards)
        self.seen = IdIndex()       # ids met in this source so far (duplicates are failures)
        self.failure_seen = IdIndex()
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.fail_parts: list[pa.Table] = []
        self.fail_rows = 0
        self.default_split = cfg.split or "train"
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-writer")
        self.inflight: Future | None = None

    def open_store(self, existing: FeatureStore | None) -> None:
        cfg, src = self.cfg, self.src
        if existing is not None:
            labels = existing.label_columns
            wanted = [x for x in cfg.labels if x not in labels]
            if wanted:
                raise StoreError(f"{existing.root}: --labels {wanted} are not label columns of this store "
                                 f"({list(labels)}); import into a new store to keep them")
            self.report.ignored_labels = tuple(x for x in src.label_candidates if x not in labels)
        else:
            labels = tuple(src.label_candidates)
        backbone = BackboneInfo(name=cfg.backbone, revision=cfg.revision, dim=int(src.dim or 0))
        source = {"name": str(cfg.source), "kind": "import", "format": src.kind,
                  "manifest_sha256": _fingerprint(src, cfg)}
        self.store = FeatureStore.create(cfg.store, backbone, labels, source=source)
        if existing is None:
            self.known = self.store.id_index()  # empty unless another writer raced us; cheap either way
        fails = self.store.failures_table()
        if fails.num_rows:
            self.failure_seen.add_hashes(*_failure_keys(fails.column("id"), fails.column("source"),
                                                        fails.column("reason")))
        self.report.label_columns = self.store.label_columns
        self.report.dim = self.store.dim

    def process(self, chunk: Chunk) -> None:
        n = len(chunk)
        rep = self.report
        rep.rows_read += n
        for f in chunk.failures:
            self._fail_records([f.id], [f.source], [f.reason], [f.split or self.default_split])
        if n == 0:
            return
        reason = chunk.bad.copy()
        ids = chunk.ids
        no_id = np.asarray(pc.fill_null(pc.equal(pc.utf8_length(ids), 0), True), dtype=bool)
        h1, h2 = hash_ids(ids)
        order = np.lexsort((h2, h1))
        same = (h1[order][1:] == h1[order][:-1]) & (h2[order][1:] == h2[order][:-1])
        dup = np.zeros(n, bool)
        dup[order[1:][same]] = True              # lexsort is stable: the first occurrence is kept
        dup |= self.seen.contains_hashes(h1, h2)
        first = ~dup & ~no_id
        self.seen.add_hashes(h1[first], h2[first])
        existing = first & self.known.contains_hashes(h1, h2)
        reason[no_id] = "missing id"
        reason[dup & ~no_id] = "duplicate id within the source"
        todo = first & ~existing & np.equal(reason, None)
        emb16 = self._validate(chunk, reason, todo)
        ok = todo & np.equal(reason, None)
        rep.skipped_existing += int(existing.sum())
        failed = np.flatnonzero(~existing & ~ok)
        if len(failed):
            split = (pc.fill_null(chunk.split, self.default_split) if chunk.split is not None and self.cfg.split
                     is None else None)
            self._fail_records(
                pc.fill_null(ids.take(pa.array(failed)), "").to_pylist(),
                chunk.where(failed),
                reason[failed].tolist(),
                split.take(pa.array(failed)).to_pylist() if split is not None else [self.default_split] * len(failed),
            )
        if ok.any():
            keep = ok[todo]  # ok is a subset of todo, and emb16 holds the todo rows
            self._add_rows(chunk, ok, emb16 if keep.all() else emb16[keep])

    def _validate(self, chunk: Chunk, reason: np.ndarray, todo: np.ndarray) -> np.ndarray:
        """Vectorised checks on the rows still in play (the first failing check names the reason).

        Returns the float16 embeddings of the ``todo`` rows: the cast is done once, here, and doubles as
        the overflow test — a value beyond ±65504 becomes inf — so no float32 temporaries are made. Only
        rows that are not finite in float16 are looked at again in the source dtype, to tell NaN/inf from
        overflow.
        """
        lat, lon = chunk.lat, chunk.lon
        with np.errstate(invalid="ignore"):
            checks = [
                (~np.isfinite(lat) | ~np.isfinite(lon), "latitude/longitude missing, NaN or infinite"),
                (np.abs(lat) > 90, "latitude outside [-90, 90]"),
                (np.abs(lon) > 180, "longitude outside [-180, 180]"),
            ]
        idx = np.flatnonzero(todo)
        src = chunk.emb if len(idx) == len(chunk) else chunk.emb[idx]
        with np.errstate(over="ignore", invalid="ignore"):
            emb16 = np.ascontiguousarray(src, dtype=np.float16)
        bad_rows = np.flatnonzero(~finite_rows_f16(emb16))
        if len(bad_rows):
            orig_finite = np.isfinite(src[bad_rows]).all(axis=1)
            m_nan = np.zeros(len(todo), bool)
            m_nan[idx[bad_rows[~orig_finite]]] = True
            m_big = np.zeros(len(todo), bool)
            m_big[idx[bad_rows[orig_finite]]] = True
            checks += [(m_nan, "embedding has NaN/inf values"),
                       (m_big, f"embedding values beyond float16 range (|x| > {FP16_MAX:g})")]
        for mask, text in checks:
            hit = todo & mask & np.equal(reason, None)
            reason[hit] = text
        return emb16

    def _fail_records(self, ids: list, sources: list, reasons: list, splits: list) -> None:
        t = pa.table({"id": pa.array(ids, pa.string()), "source": pa.array(sources, pa.string()),
                      "reason": pa.array(reasons, pa.string())})
        self.report.failed += len(ids)
        self.report.reasons.update(reasons)
        k1, k2 = _failure_keys(t.column("id"), t.column("source"), t.column("reason"))
        new = ~self.failure_seen.contains_hashes(k1, k2)
        self.failure_seen.add_hashes(k1[new], k2[new])
        if not new.any():
            return
        keep = pa.array(new)
        n = int(new.sum())
        now = _utc_now()
        table = pa.table({
            "id": t.column("id").filter(keep), "split": pa.array(splits, pa.string()).filter(keep),
            "source": t.column("source").filter(keep), "reason": t.column("reason").filter(keep),
            "task": pa.array([self.task] * n, pa.string()), "time": pa.array([now] * n, pa.string()),
        }, schema=FAILURE_SCHEMA)
        self.fail_parts.append(table)
        self.fail_rows += n

    def _add_rows(self, chunk: Chunk, ok: np.ndarray, emb16: np.ndarray) -> None:
        assert self.store is not None
        sel = pa.array(ok)
        idx = np.flatnonzero(ok)
        if chunk.split is not None and self.cfg.split is None:
            splits = pc.fill_null(chunk.split.filter(sel), self.default_split)
        else:
            splits = self.default_split
        labels = {c: chunk.labels[c].filter(sel) for c in self.store.label_columns if c in chunk.labels}
        table = build_table(chunk.ids.filter(sel), splits, chunk.lat[idx], chunk.lon[idx], emb16, labels,
                            self.store.label_columns)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.cfg.shard_rows:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Hand full shards of pending rows to the writer thread; with ``final``, write everything left
        (rows and failures) and wait until all of it is committed."""
        assert self.store is not None
        if self.pending:
            table = pa.concat_tables(self.pending)
            self.pending, self.pending_rows = [], 0
            step = self.cfg.shard_rows
            cut = table.num_rows if final else (table.num_rows // step) * step
            for start in range(0, cut, step):
                self._submit(table.slice(start, min(step, cut - start)))
            if cut < table.num_rows:
                rest = table.slice(cut)
                self.pending, self.pending_rows = [rest], rest.num_rows
        if final:
            self._drain()
            if self.fail_parts:
                rec = self.store.write_failures_file(pa.concat_tables(self.fail_parts), self.task)
                self.fail_parts, self.fail_rows = [], 0
                if rec is not None:
                    self.store.commit([], [rec])
                    self.report.failures_recorded += rec["rows"]

    def _submit(self, part: pa.Table) -> None:
        """Write one shard on the writer thread (Parquet encoding releases the GIL, so it overlaps with
        reading and validating the next chunk); at most one shard is in flight, which bounds memory."""
        assert self.store is not None
        self._drain()
        # ``known`` is only read from here on (ids of this run are caught by ``seen``), so sharing it with
        # the writer thread is safe.
        self.inflight = self.writer.submit(self.store.write_shard_file, part, self.task, known_ids=self.known)

    def _drain(self) -> None:
        """Commit the shard in flight (the manifest is only ever touched from this thread)."""
        if self.inflight is None:
            return
        rec = self.inflight.result()
        self.inflight = None
        assert self.store is not None
        self.store.commit([rec])
        self.report.imported += int(rec["rows"])
        self.report.shards_written += 1


def _prefetch(chunks: Iterator[Chunk], depth: int = 1) -> Iterator[Chunk]:
    """Read the next chunk on a background thread while this one is processed (bounded queue)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for c in chunks:
                if not put(c):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    t = threading.Thread(target=run, name="import-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


def _utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def import_embeddings(cfg: ImportConfig) -> ImportReport:
    """Stream ``cfg.source`` into the store at ``cfg.store``; returns counts (never raises for bad rows).

    Raises :class:`InputError` / :class:`StoreError` only for problems with the whole source or store
    (nothing readable, unknown columns, a store of another backbone or dimension).
    """
    from tqdm import tqdm

    if cfg.chunk_rows <= 0 or cfg.shard_rows <= 0:
        raise InputError("chunk_rows and shard_rows must be positive")
    src = open_source(cfg)
    existing: FeatureStore | None = None
    if (Path(cfg.store) / "store.json").exists():
        existing = FeatureStore.open(cfg.store)
        if existing.backbone.name != cfg.backbone:
            raise StoreError(f"{cfg.store}: store holds {existing.backbone.name!r} embeddings, not "
                             f"{cfg.backbone!r}; use another --store directory")
        src.dim = existing.dim
    task = cfg.task or f"import-{hashlib.sha256(str(cfg.source).encode()).hexdigest()[:8]}"
    report = ImportReport(store=str(cfg.store), source=str(cfg.source), kind=src.kind, backbone=cfg.backbone,
                          max_failure_rate=cfg.max_failure_rate)
    imp = _Importer(cfg, src, report, task)
    if existing is not None:
        imp.known = existing.id_index()
        src.skip_index = imp.known  # lets readers skip decoding embeddings of row groups already stored
    bar = tqdm(total=src.total, unit="row", unit_scale=True, desc="import", disable=not cfg.progress,
               file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
    held: list[Chunk] = []
    try:
        for chunk in _prefetch(src.chunks()):
            if imp.store is None:
                if src.dim is None:  # nothing readable yet: keep the (failing) chunk until a dim is known
                    held.append(chunk)
                    continue
                imp.open_store(existing)
                for h in held:
                    imp.process(h)
                held = []
            imp.process(chunk)
            bar.update(len(chunk))
            bar.set_postfix(new=report.imported + imp.pending_rows, skip=report.skipped_existing,
                            fail=report.failed, refresh=False)
    finally:
        bar.close()
    if imp.store is None:
        if existing is None:
            reasons = Counter(r for h in held for r in h.bad if r) + Counter(f.reason for h in held
                                                                             for f in h.failures)
            top = "; ".join(f"{r} × {k}" for r, k in reasons.most_common(3)) or "the source is empty"
            raise InputError(f"{cfg.source}: no usable embedding to import ({top})")
        imp.open_store(existing)
        for h in held:
            imp.process(h)
    try:
        imp.flush(final=True)
    finally:
        imp.writer.shutdown(wait=True)
        imp.store.close()
    return report
