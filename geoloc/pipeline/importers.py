"""Bring existing embeddings into the feature store: webdataset tars, Parquet files, NumPy + metadata pairs.

This module is the import job (options, the per-chunk checks, the writer); each source kind is read by its
own module — :mod:`~geoloc.pipeline.source_wds`, :mod:`~geoloc.pipeline.source_parquet`,
:mod:`~geoloc.pipeline.source_numpy` — into :class:`~geoloc.pipeline.source_common.Chunk` s.

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

import datetime as dt
import glob
import hashlib
import json
import shutil
import sys
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geoloc.config import ImportConfig
from geoloc.errors import InputError, StoreError
from geoloc.pipeline.prefetch import Prefetcher
from geoloc.pipeline.source_common import Chunk
from geoloc.pipeline.source_numpy import NumpySource
from geoloc.pipeline.source_parquet import ParquetSource
from geoloc.pipeline.source_wds import WdsSource
from geoloc.pipeline.store import (
    FAILURE_SCHEMA,
    WRITE_LOCK,
    BackboneInfo,
    FeatureStore,
    IdIndex,
    build_table,
    finite_rows_f16,
    hash_ids,
    writer_lock,
)
from geoloc.progress import progress_bar

__all__ = ["ImportConfig", "ImportReport", "import_embeddings", "open_source"]

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
    lost_rows: int = 0  # rows of unreadable row groups / files (counted in ``failed``)
    lost_unknown: int = 0  # unreadable files whose row count is unknown (each counted as 1)
    lost_where: list[str] = field(default_factory=list)

    @property
    def failure_rate(self) -> float:
        return self.failed / max(1, self.rows_read)

    @property
    def ok(self) -> bool:
        # A file of unknown size was lost: nobody can say the loss is within the limit (unless it is 100%).
        unknown_trips = self.lost_unknown > 0 and self.max_failure_rate < 1.0
        return self.failure_rate <= self.max_failure_rate and not unknown_trips

    def summary(self) -> str:
        lines = [
            f"{self.source} ({self.kind}) → {self.store} [{self.backbone}, dim {self.dim}]",
            f"  imported {self.imported}, skipped (already in store) {self.skipped_existing}, "
            f"failed {self.failed} ({self.failure_rate:.2%}; limit {self.max_failure_rate:.2%}), "
            f"{self.shards_written} shard(s) written",
        ]
        if self.imported == 0 and self.skipped_existing and not self.failed:
            lines.append(f"  nothing new: 0 new, {self.skipped_existing} already present")
        if self.lost_rows or self.lost_unknown:
            unknown = (
                f" + {self.lost_unknown} unreadable file(s) of unknown size (≥1 row each)"
                if self.lost_unknown
                else ""
            )
            where = ", ".join(self.lost_where[:5]) + (" …" if len(self.lost_where) > 5 else "")
            lines.append(
                f"  lost: {self.lost_rows} row(s) in unreadable row groups/files{unknown}, at {where}"
            )
        lines += [f"  failure: {r} × {k}" for r, k in self.reasons.most_common(10)]
        if self.ignored_labels:
            lines.append(
                f"  note: label(s) {list(self.ignored_labels)} are not columns of this store; not kept"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- sources
def _detect_kind(source: str) -> str:
    p = Path(source)
    names = [source] if not p.is_dir() else [f.name for f in p.rglob("*") if f.is_file()]
    if any(ch in source for ch in "*?["):
        names = glob.glob(source, recursive=True)
    exts = {
        ("tar" if n.lower().endswith(".tar.gz") else n.rsplit(".", 1)[-1].lower()) for n in names if "." in n
    }
    for kind, ext in (("wds", {"tar", "tgz"}), ("parquet", {"parquet", "pq"}), ("numpy", {"npy"})):
        if exts & ext:
            return kind
    raise InputError(f"{source}: cannot tell the source kind (expected .tar, .parquet or .npy); pass --kind")


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
    joined = pc.binary_join_element_wise(
        pc.fill_null(ids, ""), pc.fill_null(sources, ""), pc.fill_null(reasons, ""), "\x00"
    )
    return hash_ids(joined)


class _Importer:
    """The per-chunk bookkeeping of one import: id indices, pending shard rows, pending failures."""

    def __init__(self, cfg: ImportConfig, src: Source, report: ImportReport, task: str) -> None:
        self.cfg, self.src, self.report, self.task = cfg, src, report, task
        self.store: FeatureStore | None = None
        self.known = IdIndex()  # ids in the store when the import started (read-only afterwards)
        self.seen = IdIndex()  # ids met in this source so far (duplicates are failures)
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
                raise StoreError(
                    f"{existing.root}: --labels {wanted} are not label columns of this store "
                    f"({list(labels)}); import into a new store to keep them"
                )
            self.report.ignored_labels = tuple(x for x in src.label_candidates if x not in labels)
        else:
            labels = tuple(src.label_candidates)
        backbone = BackboneInfo(name=cfg.backbone, revision=cfg.revision, dim=int(src.dim or 0))
        source = {
            "name": str(cfg.source),
            "kind": "import",
            "format": src.kind,
            "manifest_sha256": _fingerprint(src, cfg),
        }
        self.store = FeatureStore.create(cfg.store, backbone, labels, source=source)
        if existing is None:
            self.known = self.store.id_index()  # empty unless another writer raced us; cheap either way
        fails = self.store.failures_table()
        if fails.num_rows:
            self.failure_seen.add_hashes(
                *_failure_keys(fails.column("id"), fails.column("source"), fails.column("reason"))
            )
        self.report.label_columns = self.store.label_columns
        self.report.dim = self.store.dim

    def process(self, chunk: Chunk) -> None:
        n = len(chunk)
        rep = self.report
        rep.rows_read += n
        for f in chunk.failures:
            self._fail_records([f.id], [f.source], [f.reason], [f.split or self.default_split])
        if chunk.failures and (chunk.lost_rows is None or chunk.lost_rows > 0):
            # An unreadable region: its failure record stands for all its rows (issue 11: a corrupt row group
            # of 6,000 rows used to count as 1 failed row and never trip --max-failure-rate).
            lost = 1 if chunk.lost_rows is None else chunk.lost_rows
            rep.rows_read += lost
            rep.failed += max(0, lost - len(chunk.failures))
            rep.lost_rows += chunk.lost_rows or 0
            rep.lost_unknown += chunk.lost_rows is None
            rep.lost_where += [f.source for f in chunk.failures]
        if n == 0:
            return
        reason = chunk.bad.copy()
        ids = chunk.ids
        no_id = np.asarray(pc.fill_null(pc.equal(pc.utf8_length(ids), 0), True), dtype=bool)
        h1, h2 = hash_ids(ids)
        order = np.lexsort((h2, h1))
        same = (h1[order][1:] == h1[order][:-1]) & (h2[order][1:] == h2[order][:-1])
        dup = np.zeros(n, bool)
        dup[order[1:][same]] = True  # lexsort is stable: the first occurrence is kept
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
            split = (
                pc.fill_null(chunk.split, self.default_split)
                if chunk.split is not None and self.cfg.split is None
                else None
            )
            self._fail_records(
                pc.fill_null(ids.take(pa.array(failed)), "").to_pylist(),
                chunk.where(failed),
                reason[failed].tolist(),
                split.take(pa.array(failed)).to_pylist()
                if split is not None
                else [self.default_split] * len(failed),
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
            checks += [
                (m_nan, "embedding has NaN/inf values"),
                (m_big, f"embedding values beyond float16 range (|x| > {FP16_MAX:g})"),
            ]
        for mask, text in checks:
            hit = todo & mask & np.equal(reason, None)
            reason[hit] = text
        return emb16

    def _fail_records(self, ids: list, sources: list, reasons: list, splits: list) -> None:
        t = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "source": pa.array(sources, pa.string()),
                "reason": pa.array(reasons, pa.string()),
            }
        )
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
        table = pa.table(
            {
                "id": t.column("id").filter(keep),
                "split": pa.array(splits, pa.string()).filter(keep),
                "source": t.column("source").filter(keep),
                "reason": t.column("reason").filter(keep),
                "task": pa.array([self.task] * n, pa.string()),
                "time": pa.array([now] * n, pa.string()),
            },
            schema=FAILURE_SCHEMA,
        )
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
        table = build_table(
            chunk.ids.filter(sel),
            splits,
            chunk.lat[idx],
            chunk.lon[idx],
            emb16,
            labels,
            self.store.label_columns,
        )
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


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def import_embeddings(cfg: ImportConfig) -> ImportReport:
    """Stream ``cfg.source`` into the store at ``cfg.store``; returns counts (never raises for bad rows).

    Raises :class:`InputError` / :class:`StoreError` only for problems with the whole source or store
    (nothing readable, unknown columns, a store of another backbone or dimension).
    """
    if cfg.chunk_rows <= 0 or cfg.shard_rows <= 0:
        raise InputError("chunk_rows and shard_rows must be positive")
    src = open_source(cfg)
    root = Path(cfg.store)
    fresh = not root.exists()
    try:
        # The lock comes before the store's ids are read: see writer_lock.
        with writer_lock(root, "`geoloc store import`", wait_s=cfg.wait_s, notify=_tell):
            return _import_locked(cfg, src)
    finally:
        if fresh and root.is_dir() and [p.name for p in root.iterdir()] == [WRITE_LOCK]:
            shutil.rmtree(root, ignore_errors=True)  # nothing was imported: leave no empty store behind


def _tell(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _import_locked(cfg: ImportConfig, src: Source) -> ImportReport:
    existing: FeatureStore | None = None
    if (Path(cfg.store) / "store.json").exists():
        existing = FeatureStore.open(cfg.store)
        if existing.backbone.name != cfg.backbone:
            raise StoreError(
                f"{cfg.store}: store holds {existing.backbone.name!r} embeddings, not "
                f"{cfg.backbone!r}; use another --store directory"
            )
        src.dim = existing.dim
    task = cfg.task or f"import-{hashlib.sha256(str(cfg.source).encode()).hexdigest()[:8]}"
    report = ImportReport(
        store=str(cfg.store),
        source=str(cfg.source),
        kind=src.kind,
        backbone=cfg.backbone,
        max_failure_rate=cfg.max_failure_rate,
    )
    imp = _Importer(cfg, src, report, task)
    if existing is not None:
        imp.known = existing.id_index()
        src.skip_index = imp.known  # lets readers skip decoding embeddings of row groups already stored
    bar = progress_bar(
        src.total, "import", unit="row", enabled=cfg.progress, unit_scale=True, mininterval=0.5
    )
    held: list[Chunk] = []
    # The next chunk is read on a background thread while this one is validated and written.
    chunks = Prefetcher(src.chunks(), depth=1, name="import-reader", join_s=5.0)
    try:
        for chunk in chunks:
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
            bar.set_postfix(
                new=report.imported + imp.pending_rows,
                skip=report.skipped_existing,
                fail=report.failed,
                refresh=False,
            )
    finally:
        chunks.close()
        bar.close()
    if imp.store is None:
        if existing is None:
            reasons = Counter(r for h in held for r in h.bad if r) + Counter(
                f.reason for h in held for f in h.failures
            )
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
