"""The feature store: zstd Parquet shards of (id, split, lat, lon, labels, emb) plus one manifest, store.json.

Why a manifest instead of globbing: a batch job can be SIGKILLed between renaming a shard into place and
recording it. Readers only ever see the shards *listed* in ``store.json``, so such a file is an orphan: it is
invisible, its ids count as not embedded (they are redone, never duplicated), ``verify`` reports it and the
next write-open deletes it. Every file — shard, failures table, manifest — is written under a temporary name,
fsynced, renamed with ``os.replace`` and the directory fsynced, so a reader sees either the old or the new
state, never half a file.

Layout::

    STORE/store.json
    STORE/shards/part-<task>-<seq:06d>.parquet
    STORE/failures/fail-<task>-<seq:06d>.parquet

Several writer processes (embed workers, ``--engine ray`` actors on one file system) may share a store: each
uses its own ``task`` name, and :meth:`FeatureStore.commit` serialises manifest updates with an exclusive
``flock``. Orphan clean-up runs only when no other writer holds the store open, so it never deletes a shard
that another live process is about to commit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geoloc.errors import InputError, StoreError
from geoloc.files import atomic_write, atomic_write_bytes, fsync_dir, sha256_file
from geoloc.pipeline.items import Failure
from geoloc.pipeline.sql import sql_str

__all__ = [
    "FAILURE_SCHEMA",
    "FORMAT",
    "VERSION",
    "BackboneInfo",
    "FeatureStore",
    "IdIndex",
    "VerifyReport",
    "build_table",
    "failure_table",
    "finite_rows_f16",
    "hash_ids",
    "repair_store",
    "store_schema",
    "writer_is_live",
    "writer_lock",
]

FORMAT = "geoloc-feature-store"
VERSION = 1
ROW_GROUP_SIZE = 16_384
MANIFEST = "store.json"
_TASK_RE = re.compile(r"^[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*$")
_SHARD_RE = re.compile(r"^part-(?P<task>.+)-(?P<seq>\d{6})\.parquet$")
_FAIL_RE = re.compile(r"^fail-(?P<task>.+)-(?P<seq>\d{6})\.parquet$")
_BASE_COLUMNS = ("id", "split", "lat", "lon")

FAILURE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("source", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("task", pa.string()),
        pa.field("time", pa.string()),
    ]
)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class BackboneInfo:
    """What produced the embeddings: a store only ever holds vectors from one backbone.

    ``preprocessing`` is a JSON-able dict (crop, resize, mean/std, pooling ...). It is compared by value and
    hashed through its canonical JSON, so the dataclass stays usable as a dict key despite holding a dict.
    """

    name: str
    revision: str
    dim: int
    preprocessing: dict = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.name, self.revision, self.dim, _canonical(self.preprocessing)))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "revision": self.revision,
            "dim": int(self.dim),
            "preprocessing": dict(self.preprocessing),
        }

    @classmethod
    def from_json(cls, d: dict) -> BackboneInfo:
        return cls(
            name=str(d["name"]),
            revision=str(d.get("revision", "")),
            dim=int(d["dim"]),
            preprocessing=dict(d.get("preprocessing") or {}),
        )


def store_schema(dim: int, label_columns: Sequence[str] = ()) -> pa.Schema:
    """The one shard schema: id, split, lat, lon, the store's label columns, emb as fixed-size float16."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("lat", pa.float64(), nullable=False),
        pa.field("lon", pa.float64(), nullable=False),
    ]
    fields += [pa.field(c, pa.string()) for c in label_columns]
    fields.append(pa.field("emb", pa.list_(pa.float16(), int(dim)), nullable=False))
    return pa.schema(fields)


def _check_label_columns(label_columns: Sequence[str]) -> tuple[str, ...]:
    cols = tuple(str(c) for c in label_columns)
    clash = [c for c in cols if c in (*_BASE_COLUMNS, "emb")]
    if clash:
        raise StoreError(f"label column(s) {clash} clash with the store's own columns; rename them")
    if len(set(cols)) != len(cols):
        raise StoreError(f"label columns {list(cols)} contain duplicates")
    return cols


def finite_rows_f16(emb16: np.ndarray) -> np.ndarray:
    """Per row of a float16 (N, dim) array: all values finite? Tested on the exponent bits as uint16,
    ~3x faster than ``np.isfinite`` on float16, which numpy evaluates element by element."""
    bits = np.ascontiguousarray(emb16, dtype=np.float16).view(np.uint16)
    return ((bits & 0x7C00) != 0x7C00).all(axis=1)


def _emb_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """(N, dim) floats → fixed_size_list<float16>[dim], sharing the fp16 buffer (no per-row work)."""
    flat = np.ascontiguousarray(emb, dtype=np.float16).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), int(emb.shape[1]))


def build_table(
    ids: Sequence[str] | pa.Array | np.ndarray,
    splits: str | Sequence[str] | pa.Array | np.ndarray,
    lat: Any,
    lon: Any,
    emb: np.ndarray,
    labels: dict[str, Sequence[str | None] | pa.Array] | None = None,
    label_columns: Sequence[str] = (),
    *,
    check: bool = True,
) -> pa.Table:
    """Assemble one shard table in the store schema; ``emb`` of any float dtype is cast to float16.

    ``splits`` may be one string for all rows. Labels missing from ``labels`` become null columns; labels
    not in ``label_columns`` are an error (the set of label columns is fixed per store). With ``check``
    (default) coordinates must be finite and in range and embeddings finite *after* the fp16 cast (values
    beyond ±65504 overflow to inf) — :class:`InputError` otherwise; batch jobs validate first and turn bad
    rows into failures, so this is a last line of defence, not the place where rows are filtered.
    """
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise InputError(f"embeddings must be a 2-D (N, dim) array, got shape {emb.shape}")
    n, dim = emb.shape
    label_columns = _check_label_columns(label_columns)
    labels = dict(labels or {})
    unknown = sorted(set(labels) - set(label_columns))
    if unknown:
        raise InputError(f"labels {unknown} are not label columns of this store ({list(label_columns)})")
    lat = np.asarray(lat, dtype=np.float64).reshape(-1)
    lon = np.asarray(lon, dtype=np.float64).reshape(-1)
    id_arr = pc.cast(ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids), pa.string())
    if isinstance(splits, str):
        split_arr = pa.array(np.full(n, splits, dtype=object), type=pa.string())
    else:
        split_arr = pc.cast(
            splits if isinstance(splits, (pa.Array, pa.ChunkedArray)) else pa.array(splits), pa.string()
        )
    for what, arr_len in (
        ("ids", len(id_arr)),
        ("splits", len(split_arr)),
        ("lat", len(lat)),
        ("lon", len(lon)),
    ):
        if arr_len != n:
            raise InputError(
                f"{what} has {arr_len} rows but emb has {n}; all columns must have the same length"
            )
    with np.errstate(over="ignore"):
        emb16 = np.ascontiguousarray(emb, dtype=np.float16)
    if check:
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(lat) | ~np.isfinite(lon) | (np.abs(lat) > 90) | (np.abs(lon) > 180)
        if bad.any():
            raise InputError(
                f"{int(bad.sum())} row(s) with NaN/inf/out-of-range lat/lon (first at row "
                f"{int(np.flatnonzero(bad)[0])}); filter them before building a shard"
            )
        finite = finite_rows_f16(emb16)
        if n and not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise InputError(f"non-finite embedding (or beyond float16 range) at row {row}; filter it first")
        if id_arr.null_count or split_arr.null_count:
            raise InputError("ids and splits must not be null")
    columns: list[pa.Array] = [id_arr, split_arr, pa.array(lat), pa.array(lon)]
    for col in label_columns:
        if col in labels:
            v = labels[col]
            a = v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(list(v), type=pa.string())
            a = pc.cast(a, pa.string())
            if len(a) != n:
                raise InputError(f"label column {col!r} has {len(a)} rows but emb has {n}")
            columns.append(a)
        else:
            columns.append(pa.nulls(n, pa.string()))
    columns.append(_emb_array(emb16) if n else pa.array([], type=pa.list_(pa.float16(), int(dim))))
    columns = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns]
    return pa.Table.from_arrays(columns, schema=store_schema(dim, label_columns))


def failure_table(failures: Sequence[Failure], task: str, time: str | None = None) -> pa.Table:
    """Failures → a table in :data:`FAILURE_SCHEMA` (one ``time`` for the whole batch)."""
    t = time or _now()
    return pa.table(
        {
            "id": [f.id for f in failures],
            "split": [f.split for f in failures],
            "source": [f.source for f in failures],
            "reason": [f.reason for f in failures],
            "task": [task] * len(failures),
            "time": [t] * len(failures),
        },
        schema=FAILURE_SCHEMA,
    )


def _write_parquet_atomic(table: pa.Table, final: Path) -> str:
    """zstd Parquet, dictionary encoding only for strings (never emb), written atomically; returns sha256."""
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]

    def write(tmp: str) -> None:
        # No statistics for emb: min/max of float16 values cost half the write time and serve nobody.
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            row_group_size=ROW_GROUP_SIZE,
            use_dictionary=strings,
            write_statistics=[n for n in table.column_names if n != "emb"],
        )

    atomic_write(final, write)
    return sha256_file(final)


def _listed_file_ok(path: Path, record: dict, checksums: bool, report: VerifyReport) -> bool:
    """A file listed in store.json exists (and, with ``checksums``, matches its sha256); else a problem."""
    if not path.is_file():
        report.problems.append(f"{record['file']}: listed but missing")
        return False
    if checksums and sha256_file(path) != record.get("sha256"):
        report.problems.append(f"{record['file']}: sha256 mismatch (file changed or truncated)")
        return False
    return True


@dataclass
class VerifyReport:
    """What ``verify`` found. ``ok`` is false iff ``problems`` is non-empty (orphans are problems too)."""

    root: str
    shards: int = 0
    rows: int = 0
    failures: int = 0
    problems: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)  # unlisted files of a live writer (not problems)
    holder: str = ""
    duplicate_ids: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (
            f"{self.root}: {self.shards} shard(s), {self.rows} row(s), {self.failures} failure(s): "
            f"{'OK' if self.ok else f'{len(self.problems)} problem(s)'}"
        )
        lines = [head, *(f"  - {p}" for p in self.problems)]
        if self.in_progress:
            lines.append(
                f"  note: {len(self.in_progress)} unlisted file(s) belong to a live {self.holder} "
                "(in progress, not orphans)"
            )
        if self.duplicate_ids:
            lines.append(
                f"  fix: `geoloc store repair {self.root}` removes the {self.duplicate_ids} duplicate "
                "id(s), keeping the first copy"
            )
        return "\n".join(lines)


class IdIndex:
    """A compact set of string ids: two independent 64-bit hashes per id (16 bytes per id).

    Python sets of millions of ids cost ~100 bytes each and a Python loop per lookup; this keeps a 5M-id
    store under 100 MB and answers membership for a whole Arrow column with numpy (``searchsorted``).
    A false positive needs a 128-bit collision.

    Ids are kept in sorted runs, like a log-structured merge tree: ``add`` sorts the new batch into a run
    and merges the last runs while the newest is at least half the size of the one before, so there are
    O(log n) runs and every id is re-sorted O(log n) times — adding n ids in small batches costs
    O(n log n) in total instead of a full re-sort per batch. ``contains`` searches every run.
    Not locked: share an index between threads only read-only (``contains``), with every ``add`` done before.
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (h1 sorted, h2 in the same order)

    def __len__(self) -> int:
        return sum(len(r[0]) for r in self._runs)

    @staticmethod
    def _sorted(h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(h1, kind="stable")  # radix sort for uint64; ties in h1 keep any h2 order
        return h1[order], h2[order]

    def add_hashes(self, h1: np.ndarray, h2: np.ndarray) -> None:
        if not len(h1):
            return
        self._runs.append(self._sorted(np.asarray(h1, np.uint64), np.asarray(h2, np.uint64)))
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            self._runs[-2:] = [self._merge(self._runs[-2], self._runs[-1])]

    @staticmethod
    def _merge(
        a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Merge two sorted runs in O(n): where each element of ``b`` lands, then fill the rest from ``a``."""
        pos = np.searchsorted(a[0], b[0], "right") + np.arange(len(b[0]))
        from_a = np.ones(len(a[0]) + len(b[0]), bool)
        from_a[pos] = False
        out = []
        for x, y in ((a[0], b[0]), (a[1], b[1])):
            z = np.empty(len(from_a), np.uint64)
            z[pos] = y
            z[from_a] = x
            out.append(z)
        return out[0], out[1]

    def add(self, ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> None:
        self.add_hashes(*hash_ids(ids))

    def contains_hashes(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        n = len(h1)
        if not n or not self._runs:
            return np.zeros(n, bool)
        # Sorted queries make numpy's binary search walk memory forwards (it reuses the last bound).
        order = np.argsort(h1, kind="stable")
        q1, q2 = np.asarray(h1, np.uint64)[order], np.asarray(h2, np.uint64)[order]
        hit = np.zeros(n, bool)
        for r1, r2 in self._runs:
            lo = np.minimum(np.searchsorted(r1, q1, "left"), len(r1) - 1)
            same1 = r1[lo] == q1
            hit |= same1 & (r2[lo] == q2)
            # Equal h1 with a different h2 (a 64-bit collision): look at the whole tie range. ~never happens.
            for i in np.flatnonzero(same1 & ~hit):
                j = lo[i]
                while j < len(r1) and r1[j] == q1[i] and not hit[i]:
                    hit[i] = r2[j] == q2[i]
                    j += 1
        found = np.empty(n, bool)
        found[order] = hit
        return found

    def contains(self, ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
        return self.contains_hashes(*hash_ids(ids))


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_RNG_TABLES = np.random.default_rng(0x6E0).integers(0, 2**63, size=(2, 256), dtype=np.uint64) | np.uint64(1)
_BASES = (np.uint64(0x100000001B3), np.uint64(0xC2B2AE3D27D4EB4F))
_POW_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    size = 1 << max(6, int(n - 1).bit_length())
    if size not in _POW_CACHE:
        out = []
        for b in _BASES:
            p = np.full(size, b, dtype=np.uint64)
            p[0] = 1
            with np.errstate(over="ignore"):
                out.append(np.cumprod(p, dtype=np.uint64))
        _POW_CACHE[size] = (out[0], out[1])
    return _POW_CACHE[size]


def hash_ids(ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two 64-bit hashes per string, computed from the Arrow buffers with numpy only (no per-row Python).

    Each byte goes through a random table, is weighted by base**position and summed per string (a cumulative
    sum differenced at the offsets), then length-mixed and finalised with splitmix64.
    """
    arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), type=pa.string())
    arr = pc.cast(arr, pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    n = len(arr)
    if n == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(bufs[2], dtype=np.uint8)[start:end] if bufs[2] is not None else np.empty(0, np.uint8)
    rel = offsets - start
    lengths = np.diff(rel)
    pos = np.arange(end - start, dtype=np.int64) - np.repeat(rel[:-1], lengths)
    out = []
    with np.errstate(over="ignore"):
        for k in range(2):
            pw = _powers(int(lengths.max()) + 1 if len(lengths) else 1)[k]
            terms = _RNG_TABLES[k][data] * pw[pos]
            cs = np.concatenate([np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)])
            h = cs[rel[1:]] - cs[rel[:-1]]
            h = _splitmix(h ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15 + k)))
            out.append(h & _MASK64)
    return out[0], out[1]


WRITE_LOCK = ".write-lock"
CHECK_CACHE = ".checked.json"  # shard → [size:mtime_ns, sha256] as last checked by a reader
_CHECKED: dict[str, dict[str, str]] = {}  # the same, in this process (resolved path → {size:mtime: sha256})


def _lock_holder(root: Path) -> str:
    """Who holds the writer lock, as its holder wrote it ("`geoloc embed` (pid 123)"), or a generic name."""
    try:
        text = (root / WRITE_LOCK).read_text().strip()
    except OSError:
        text = ""
    return text or "writer"


@contextlib.contextmanager
def writer_lock(
    root: str | os.PathLike, what: str, *, wait_s: float = 0.0, notify: Callable[[str], None] | None = None
) -> Iterator[None]:
    """One writing job per store at a time (``embed``, ``store import``, ``store repair``, any future writer).

    Taken *before* the job reads which ids the store already holds: two jobs that each checked the ids and
    then wrote would both add the ids missing at that moment — duplicates. An exclusive ``flock`` on
    ``STORE/.write-lock``, released by the kernel even on SIGKILL. The holder writes ``what`` and its pid
    into the file so a second writer can say who is in the way. When the lock is busy: with ``wait_s`` > 0,
    say so once through ``notify`` and poll until it frees or ``wait_s`` runs out; then (or at once with
    ``wait_s`` = 0) raise a one-line :class:`StoreError`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # At least a moment's grace: `verify` probes the lock briefly and must not make a writer fail.
        deadline = time.monotonic() + max(0.5, wait_s)
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(root)
                if time.monotonic() >= deadline:
                    waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
                    raise StoreError(
                        f"{root}: another {holder} is writing to this store{waited}; wait for it "
                        "to finish (or pass --wait SECONDS) and run again"
                    ) from None
                if not told and notify is not None and wait_s > 0:
                    notify(
                        f"{root}: another {holder} is writing to this store; waiting up to {wait_s:g} s ..."
                    )
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()})\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def writer_is_live(root: str | os.PathLike) -> bool:
    """Is a writing job (embed, import, repair) running on this store right now, i.e. holding its lock?

    Only the job lock counts, not a bare write-open :class:`FeatureStore`: a job holds the lock from before
    it reads the store's ids until its last commit, so unlisted files seen meanwhile are its work in progress.
    """
    path = Path(root) / WRITE_LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class FeatureStore:
    """A directory of feature shards and its manifest; see the module docstring and notes/store-spec.md."""

    def __init__(self, root: Path, manifest: dict, *, writable: bool) -> None:
        self.root = Path(root)
        self._manifest = manifest
        self._writable = writable
        self._writers_fd: int | None = None
        self._seq: dict[tuple[str, str], int] = {}
        self.backbone = BackboneInfo.from_json(manifest["backbone"])
        self.dim = self.backbone.dim
        self.label_columns: tuple[str, ...] = tuple(manifest.get("label_columns", ()))

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        backbone: BackboneInfo,
        label_columns: Sequence[str] = (),
        source: dict | None = None,
    ) -> FeatureStore:
        """Create a store, or open an existing one for writing after checking it is compatible.

        An existing store must hold the same backbone (name and dim) — anything else would mix vector spaces.
        Its label columns win when ``label_columns`` is empty; otherwise they must be the same set. Orphan
        shard/failure files and stale temporaries are deleted (only when no other writer has the store open).
        """
        root = Path(root)
        label_columns = _check_label_columns(label_columns)
        if int(backbone.dim) <= 0:
            raise StoreError(f"backbone {backbone.name!r}: dimension must be positive, got {backbone.dim}")
        root.mkdir(parents=True, exist_ok=True)
        (root / "shards").mkdir(exist_ok=True)
        (root / "failures").mkdir(exist_ok=True)
        with cls._locked(root):
            if (root / MANIFEST).exists():
                manifest = cls._read_manifest(root)
                have = BackboneInfo.from_json(manifest["backbone"])
                if have.name != backbone.name or have.dim != int(backbone.dim):
                    raise StoreError(
                        f"{root}: store holds {have.name!r} (dim {have.dim}) embeddings, "
                        f"not {backbone.name!r} (dim {backbone.dim}); use another --store directory"
                    )
                existing_labels = tuple(manifest.get("label_columns", ()))
                if label_columns and set(label_columns) != set(existing_labels):
                    raise StoreError(
                        f"{root}: store has label columns {list(existing_labels)}, "
                        f"not {list(label_columns)}; use the same label columns or another --store directory"
                    )
                dirty = False
            else:
                now = _now()
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "backbone": backbone.to_json(),
                    "label_columns": list(label_columns),
                    "sources": [],
                    "shards": [],
                    "failures": [],
                    "created": now,
                    "updated": now,
                }
                dirty = True
            if source is not None:
                key = (source.get("name"), source.get("kind"), source.get("manifest_sha256"))
                known = {
                    (s.get("name"), s.get("kind"), s.get("manifest_sha256")) for s in manifest["sources"]
                }
                if key not in known:
                    manifest["sources"].append({**source, "added": source.get("added") or _now()})
                    dirty = True
            if dirty:
                manifest["updated"] = _now()
                cls._write_manifest(root, manifest)
        store = cls(root, manifest, writable=True)
        store._join_writers()
        return store

    @classmethod
    def open(cls, root: str | os.PathLike) -> FeatureStore:
        """Open an existing store to read; :class:`StoreError` if it is missing or its manifest is corrupt."""
        root = Path(root)
        return cls(root, cls._read_manifest(root), writable=False)

    @staticmethod
    def _read_manifest(root: Path) -> dict:
        path = root / MANIFEST
        if not path.exists():
            raise StoreError(
                f"{root}: not a feature store (no {MANIFEST}); create one with `geoloc embed` "
                "or `geoloc store import`"
            )
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(
                f"{path}: unreadable store manifest ({e}); restore it or rebuild the store"
            ) from e
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{path}: not a {FORMAT} manifest")
        if m.get("version") != VERSION:
            raise StoreError(
                f"{path}: store format version {m.get('version')} is not supported (expected {VERSION})"
            )
        try:
            BackboneInfo.from_json(m["backbone"])
            for key in ("shards", "failures", "sources", "label_columns"):
                if not isinstance(m.setdefault(key, []), list):
                    raise TypeError(key)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(
                f"{path}: malformed store manifest (field {e}); restore it or rebuild the store"
            ) from e
        return m

    @staticmethod
    def _write_manifest(root: Path, manifest: dict) -> None:
        atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())

    @staticmethod
    @contextlib.contextmanager
    def _locked(root: Path) -> Iterator[None]:
        """Exclusive lock for manifest read-modify-write, across processes (released on SIGKILL too)."""
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _join_writers(self) -> None:
        """Hold a shared lock while open for writing; clean orphans only if we are the only writer."""
        fd = os.open(self.root / ".writers", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_SH)
        else:
            with self._locked(self.root):
                self._manifest = self._read_manifest(self.root)
                self._remove_orphans()
            fcntl.flock(fd, fcntl.LOCK_SH)
        self._writers_fd = fd

    def close(self) -> None:
        """Release the writer lock (also released when the process exits)."""
        if self._writers_fd is not None:
            os.close(self._writers_fd)
            self._writers_fd = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict:
        # Picklable for worker processes: the lock fd stays with the parent; a child rejoins as a writer.
        state = self.__dict__.copy()
        state["_writers_fd"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._writable:
            fd = os.open(self.root / ".writers", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._writers_fd = fd

    # ------------------------------------------------------------------ manifest views
    @property
    def manifest(self) -> dict:
        """A copy of the manifest as last read or written by this object."""
        return json.loads(json.dumps(self._manifest))

    def refresh(self) -> None:
        """Re-read store.json (another process may have committed shards)."""
        self._manifest = self._read_manifest(self.root)

    @property
    def shard_records(self) -> list[dict]:
        return list(self._manifest["shards"])

    @property
    def failure_records(self) -> list[dict]:
        return list(self._manifest["failures"])

    @property
    def sources(self) -> list[dict]:
        return list(self._manifest["sources"])

    @property
    def schema(self) -> pa.Schema:
        return store_schema(self.dim, self.label_columns)

    def shard_paths(self, split: str | None = None) -> list[Path]:
        """Listed shards in commit order (only those holding ``split`` rows, if given)."""
        return [
            self.root / r["file"]
            for r in self._manifest["shards"]
            if split is None or r.get("splits", {}).get(split, 0) > 0
        ]

    def failure_paths(self) -> list[Path]:
        return [self.root / r["file"] for r in self._manifest["failures"]]

    def num_rows(self, split: str | None = None) -> int:
        if split is None:
            return sum(int(r["rows"]) for r in self._manifest["shards"])
        return sum(int(r.get("splits", {}).get(split, 0)) for r in self._manifest["shards"])

    def rows_per_split(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self._manifest["shards"]:
            for s, k in r.get("splits", {}).items():
                out[s] = out.get(s, 0) + int(k)
        return dict(sorted(out.items()))

    def num_failures(self) -> int:
        return sum(int(r["rows"]) for r in self._manifest["failures"])

    def iter_ids(self) -> Iterator[pa.Array]:
        """The id column of every listed shard, one Arrow array per row group (bounded memory)."""
        for path in self.shard_paths():
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                yield pf.read_row_group(rg, columns=["id"]).column("id").combine_chunks()

    def existing_ids(self) -> set[str]:
        """Ids in listed shards (reads only the id column). For millions of ids prefer :meth:`id_index`."""
        out: set[str] = set()
        for ids in self.iter_ids():
            out.update(ids.to_pylist())
        return out

    def id_index(self) -> IdIndex:
        """A compact hashed set of the listed ids, with vectorised ``contains(arrow_ids) -> bool mask``."""
        index = IdIndex()
        for ids in self.iter_ids():
            index.add(ids)
        return index

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if not self._writable:
            raise StoreError(f"{self.root}: opened read-only; use FeatureStore.create(...) to write")

    def _next_path(self, kind: str, task: str) -> Path:
        if not _TASK_RE.match(task):
            raise StoreError(f"task name {task!r} must be letters, digits, '_', '.' or single '-' separators")
        folder, prefix, rx = (
            ("shards", "part", _SHARD_RE) if kind == "shard" else ("failures", "fail", _FAIL_RE)
        )
        key = (kind, task)
        if key not in self._seq:
            seqs = [-1]
            for p in (self.root / folder).iterdir():
                m = rx.match(p.name)
                if m and m["task"] == task:
                    seqs.append(int(m["seq"]))
            records = self._manifest["shards" if kind == "shard" else "failures"]
            for r in records:
                m = rx.match(Path(r["file"]).name)
                if m and m["task"] == task:
                    seqs.append(int(m["seq"]))
            self._seq[key] = max(seqs) + 1
        seq = self._seq[key]
        self._seq[key] = seq + 1
        return self.root / folder / f"{prefix}-{task}-{seq:06d}.parquet"

    def write_shard_file(self, table: pa.Table, task: str, *, known_ids: IdIndex | None = None) -> dict:
        """Write one shard atomically and return its record; it stays invisible until :meth:`commit`.

        Refuses (:class:`StoreError`) a table whose schema is not the store's, or whose ids repeat or are
        already listed. ``known_ids`` lets a caller that already keeps an index of the store skip re-reading
        every shard's ids.
        """
        self._require_writable()
        expected = self.schema
        if not table.schema.equals(expected, check_metadata=False):
            extra = sorted(set(table.column_names) - set(expected.names))
            try:
                if extra:
                    raise ValueError(f"unexpected column(s) {extra}")
                for name in self.label_columns:  # a label the writer does not know is null
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
                table = table.select(expected.names).cast(expected)
            except (KeyError, ValueError, TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise StoreError(
                    f"{self.root}: shard table does not match the store schema ({e}); "
                    "build it with build_table(..., label_columns=store.label_columns)"
                ) from e
        if table.num_rows == 0:
            raise StoreError(f"{self.root}: refusing to write an empty shard")
        ids = table.column("id")
        h1, h2 = hash_ids(ids)
        if len(np.unique(np.stack([h1, h2], 1), axis=0)) != len(h1):
            raise StoreError(f"{self.root}: shard table repeats ids; deduplicate before writing")
        index = known_ids if known_ids is not None else self.id_index()
        clash = index.contains_hashes(h1, h2)
        if clash.any():
            first = ids[int(np.flatnonzero(clash)[0])].as_py()
            raise StoreError(
                f"{self.root}: {int(clash.sum())} id(s) already in the store (e.g. {first!r}); "
                "filter with existing_ids() before writing"
            )
        path = self._next_path("shard", task)
        digest = _write_parquet_atomic(table, path)
        counts = pc.value_counts(table.column("split")).to_pylist()
        splits = {c["values"]: int(c["counts"]) for c in counts}
        return {
            "file": path.relative_to(self.root).as_posix(),
            "rows": table.num_rows,
            "sha256": digest,
            "splits": dict(sorted(splits.items())),
        }

    def commit(self, shard_records: Sequence[dict], failure_records: Sequence[dict] = ()) -> None:
        """Atomically add written shard/failure files to store.json (under the store lock)."""
        self._require_writable()
        if not shard_records and not failure_records:
            return
        for r in (*shard_records, *failure_records):
            if not (self.root / r["file"]).is_file():
                raise StoreError(f"{self.root / r['file']}: shard file vanished before commit; rerun the job")
        with self._locked(self.root):
            manifest = self._read_manifest(self.root)
            listed = {r["file"] for r in manifest["shards"]} | {r["file"] for r in manifest["failures"]}
            manifest["shards"] += [dict(r) for r in shard_records if r["file"] not in listed]
            manifest["failures"] += [dict(r) for r in failure_records if r["file"] not in listed]
            manifest["updated"] = _now()
            self._write_manifest(self.root, manifest)
            self._manifest = manifest

    def write_shard(self, table: pa.Table, task: str) -> dict:
        """:meth:`write_shard_file` + :meth:`commit` (single-process convenience)."""
        record = self.write_shard_file(table, task)
        self.commit([record])
        return record

    def write_failures_file(self, failures: Sequence[Failure] | pa.Table, task: str) -> dict | None:
        """Write a failures table atomically (not yet visible); ``None`` when there is nothing to record."""
        self._require_writable()
        table = failures if isinstance(failures, pa.Table) else failure_table(failures, task)
        if table.num_rows == 0:
            return None
        table = table.select(FAILURE_SCHEMA.names).cast(FAILURE_SCHEMA)
        path = self._next_path("failure", task)
        digest = _write_parquet_atomic(table, path)
        return {"file": path.relative_to(self.root).as_posix(), "rows": table.num_rows, "sha256": digest}

    def write_failures(self, failures: Sequence[Failure] | pa.Table, task: str) -> dict | None:
        """Record failures (file + commit); returns the record, or ``None`` if ``failures`` is empty."""
        record = self.write_failures_file(failures, task)
        if record is not None:
            self.commit([], [record])
        return record

    def remove_duplicate_ids(self) -> tuple[int, int]:
        """Drop every repeated id, keeping its first copy in commit order; returns (rows removed, shards
        rewritten). Each affected shard is rewritten atomically under a new name, the manifest swapped in
        one atomic write, and only then are the old files deleted — a crash at any point leaves either the
        old or the new store plus orphans that the next write-open removes. Run it under :func:`writer_lock`
        (``geoloc store repair`` does) so no writer adds ids meanwhile.
        """
        self._require_writable()
        removed = rewritten = 0
        with self._locked(self.root):
            manifest = self._read_manifest(self.root)
            index = IdIndex()
            records: list[dict] = []
            stale: list[Path] = []
            for r in manifest["shards"]:
                path = self.root / r["file"]
                ids = pq.read_table(path, columns=["id"]).column("id")
                h1, h2 = hash_ids(ids)
                keep = np.zeros(len(h1), bool)
                keep[np.unique(np.stack([h1, h2], 1), axis=0, return_index=True)[1]] = True
                keep &= ~index.contains_hashes(h1, h2)
                index.add_hashes(h1[keep], h2[keep])
                if keep.all():
                    records.append(r)
                    continue
                removed += int((~keep).sum())
                rewritten += 1
                stale.append(path)
                if keep.any():
                    table = pq.read_table(path).filter(pa.array(keep))
                    new = self._next_path("shard", "repair")
                    counts = pc.value_counts(table.column("split")).to_pylist()
                    records.append(
                        {
                            "file": new.relative_to(self.root).as_posix(),
                            "rows": table.num_rows,
                            "sha256": _write_parquet_atomic(table, new),
                            "splits": dict(sorted((c["values"], int(c["counts"])) for c in counts)),
                        }
                    )
            if stale:
                manifest["shards"] = records
                manifest["updated"] = _now()
                self._write_manifest(self.root, manifest)
                self._manifest = manifest
                for p in stale:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                fsync_dir(self.root / "shards")
        return removed, rewritten

    def check_shards(self, paths: Sequence[Path] | None = None) -> None:
        """Readers' guard: each listed shard (or those of ``paths``) must still match the manifest's sha256.

        A one-line :class:`StoreError` naming the first shard that is missing or changed, and pointing at
        ``geoloc store verify``. Cheap on a second run: a digest is computed once per (file, size, mtime) and
        remembered in this process and in ``STORE/.checked.json`` (best effort: a read-only store just
        rehashes), so a training run on an unchanged store re-reads nothing.
        """
        wanted = None if paths is None else {Path(p).resolve() for p in paths}
        cache_path = self.root / CHECK_CACHE
        try:
            disk = json.loads(cache_path.read_text())
            if not isinstance(disk, dict):
                disk = {}
        except (OSError, ValueError):
            disk = {}
        dirty = False
        for r in self._manifest["shards"]:
            path = self.root / r["file"]
            if wanted is not None and path.resolve() not in wanted:
                continue
            try:
                st = path.stat()
            except OSError:
                raise StoreError(
                    f"{self.root}: shard {r['file']} is listed but missing; run "
                    f"`geoloc store verify {self.root}`"
                ) from None
            key = f"{st.st_size}:{st.st_mtime_ns}"
            digest = _CHECKED.get(str(path.resolve()), {}).get(key) or (
                disk[r["file"]][1]
                if isinstance(disk.get(r["file"]), list) and disk[r["file"]][0] == key
                else None
            )
            if digest is None:
                digest = sha256_file(path)
            if digest != r.get("sha256"):
                raise StoreError(
                    f"{self.root}: shard {r['file']} does not match its checksum in {MANIFEST} "
                    f"(changed or corrupted on disk); run `geoloc store verify {self.root}`"
                )
            _CHECKED[str(path.resolve())] = {key: digest}
            if disk.get(r["file"]) != [key, digest]:
                disk[r["file"]] = [key, digest]
                dirty = True
        if dirty:
            with contextlib.suppress(OSError):
                atomic_write_bytes(cache_path, json.dumps(disk).encode())

    def orphans(self) -> list[Path]:
        """Files in shards/ and failures/ that store.json does not list (incl. stale temporaries)."""
        listed = {r["file"] for r in self._manifest["shards"]} | {
            r["file"] for r in self._manifest["failures"]
        }
        out = []
        for folder in ("shards", "failures"):
            d = self.root / folder
            if d.is_dir():
                out += [
                    p
                    for p in sorted(d.iterdir())
                    if p.is_file() and p.relative_to(self.root).as_posix() not in listed
                ]
        return out

    def _remove_orphans(self) -> None:
        removed = False
        for p in self.orphans():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed = True
        # geoloc.files temporaries (.store.json.XXXX.tmp) and older .store.json.tmp-PID ones
        for p in self.root.glob(f".{MANIFEST}.*tmp*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if removed:
            for folder in ("shards", "failures"):
                fsync_dir(self.root / folder)

    # ------------------------------------------------------------------ reading
    def failures_table(self) -> pa.Table:
        """All recorded failures as one Arrow table (empty with the right schema if none)."""
        parts = [pq.read_table(p).cast(FAILURE_SCHEMA) for p in self.failure_paths()]
        return pa.concat_tables(parts) if parts else FAILURE_SCHEMA.empty_table()

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with views ``features`` (listed shards) and ``failures``.

        ``features.emb`` is cast to ``FLOAT[dim]`` (DuckDB would otherwise read the float16 fixed-size list
        as a variable ``FLOAT[]``, which is also slower). Paths are absolute, so the views work from any cwd.
        """
        con = duckdb.connect(":memory:")
        con.execute(_view_sql("features", self.shard_paths(), self.schema, emb_dim=self.dim))
        con.execute(_view_sql("failures", self.failure_paths(), FAILURE_SCHEMA))
        return con

    # ------------------------------------------------------------------ verify
    def verify(self, *, checksums: bool = True) -> VerifyReport:
        """Check every listed file: present, sha256, row counts (total and per split), schema (emb stored
        without a dictionary), coordinates in range, ids unique across the store; list orphan files."""
        report = VerifyReport(root=str(self.root))
        self.refresh()
        expected = self.schema
        index = IdIndex()
        for r in self._manifest["shards"]:
            path = self.root / r["file"]
            report.shards += 1
            if not _listed_file_ok(path, r, checksums, report):
                continue
            try:
                pf = pq.ParquetFile(path)
            except (OSError, pa.ArrowInvalid) as e:
                report.problems.append(f"{r['file']}: unreadable Parquet ({e})")
                continue
            report.rows += pf.metadata.num_rows
            if pf.metadata.num_rows != int(r["rows"]):
                report.problems.append(
                    f"{r['file']}: {pf.metadata.num_rows} rows on disk, {r['rows']} listed"
                )
            if not pf.schema_arrow.equals(expected, check_metadata=False):
                report.problems.append(f"{r['file']}: schema {pf.schema_arrow} differs from the store schema")
                continue
            emb_idx = pf.schema_arrow.get_field_index("emb")
            for rg in range(pf.num_row_groups):
                leaf = pf.metadata.row_group(rg).column(_leaf_index(pf, emb_idx))
                if leaf.has_dictionary_page:
                    report.problems.append(f"{r['file']}: emb column is dictionary-encoded (row group {rg})")
                    break
            t = pf.read(columns=["id", "split", "lat", "lon"])
            counts = {c["values"]: int(c["counts"]) for c in pc.value_counts(t.column("split")).to_pylist()}
            if counts != {k: int(v) for k, v in r.get("splits", {}).items()}:
                report.problems.append(
                    f"{r['file']}: split counts {counts} differ from the listed {r.get('splits')}"
                )
            lat = t.column("lat").to_numpy()
            lon = t.column("lon").to_numpy()
            with np.errstate(invalid="ignore"):
                bad = ~(np.abs(lat) <= 90) | ~(np.abs(lon) <= 180)
            if bad.any():
                report.problems.append(f"{r['file']}: {int(bad.sum())} row(s) with invalid lat/lon")
            ids = t.column("id")
            h1, h2 = hash_ids(ids)
            dup_within = len(h1) - len(np.unique(np.stack([h1, h2], 1), axis=0))
            dup_across = int(index.contains_hashes(h1, h2).sum())
            if dup_within or dup_across:
                report.duplicate_ids += dup_within + dup_across
                report.problems.append(f"{r['file']}: {dup_within + dup_across} duplicate id(s)")
            index.add_hashes(h1, h2)
        for r in self._manifest["failures"]:
            path = self.root / r["file"]
            if not _listed_file_ok(path, r, checksums, report):
                continue
            n = pq.ParquetFile(path).metadata.num_rows
            report.failures += n
            if n != int(r["rows"]):
                report.problems.append(f"{r['file']}: {n} rows on disk, {r['rows']} listed")
        unlisted = [p.relative_to(self.root).as_posix() for p in self.orphans()]
        if unlisted and writer_is_live(self.root):
            report.in_progress, report.holder = unlisted, _lock_holder(self.root)
        else:
            report.orphans = unlisted
        for o in report.orphans:
            report.problems.append(f"{o}: orphan file not listed in {MANIFEST} (removed on the next write)")
        return report

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.root)!r}, backbone={self.backbone.name!r}, dim={self.dim}, "
            f"rows={self.num_rows()}, shards={len(self._manifest['shards'])})"
        )


def _leaf_index(pf: pq.ParquetFile, field_index: int) -> int:
    """Parquet leaf-column index of a top-level Arrow field (label columns are flat, emb has one leaf)."""
    names = pf.schema_arrow.names
    leaves = [pf.schema.column(i).path.split(".")[0] for i in range(len(pf.schema))]
    return leaves.index(names[field_index])


_DUCK_TYPES = {pa.string(): "VARCHAR", pa.float64(): "DOUBLE"}


def _view_sql(name: str, paths: Sequence[Path], schema: pa.Schema, emb_dim: int | None = None) -> str:
    cols = []
    for f in schema:
        if f.name == "emb" and emb_dim is not None:
            cols.append((f'"emb"::FLOAT[{emb_dim}] AS "emb"', f'NULL::FLOAT[{emb_dim}] AS "emb"'))
        else:
            q = '"' + f.name.replace('"', '""') + '"'
            cols.append((q, f"NULL::{_DUCK_TYPES[f.type]} AS {q}"))
    if not paths:
        return f"CREATE VIEW {name} AS SELECT {', '.join(c[1] for c in cols)} WHERE false"
    files = ", ".join(sql_str(str(p.resolve())) for p in paths)
    return f"CREATE VIEW {name} AS SELECT {', '.join(c[0] for c in cols)} FROM read_parquet([{files}])"


def repair_store(root: str | os.PathLike, *, wait_s: float = 0.0) -> tuple[int, int]:
    """``geoloc store repair``: under the writer lock, remove duplicate ids keeping the first copy.

    Returns (rows removed, shards rewritten); see :meth:`FeatureStore.remove_duplicate_ids`.
    """
    root = Path(root)
    backbone = FeatureStore.open(root).backbone
    with (
        writer_lock(root, "`geoloc store repair`", wait_s=wait_s),
        FeatureStore.create(root, backbone) as store,
    ):
        return store.remove_duplicate_ids()
