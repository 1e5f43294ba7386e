"""The embed job: a dataset manifest → a feature store, incrementally, resumably, robust to bad items.

One job is read → prepare → map → write (clip-retrieval's reader / mapper / writer), and an engine
(:mod:`geoloc.pipeline.engines`) decides where each stage runs:

- **read**: :func:`~geoloc.pipeline.readers.iter_items`, split into disjoint partitions by a hash of the id.
  Each partition passes the reader a ``skip_ids`` container that also rejects other partitions' ids, so a
  worker never even reads the bytes of items it does not own.
- **prepare**: decode + preprocess in DataLoader worker processes (or Ray tasks); anything wrong with an item
  (invalid coordinates, truncated/corrupt file, undecodable text) becomes a :class:`Failure` with its reason.
- **map**: the backbone on a device, in batches; non-finite outputs become failures too.
- **write**: rows are buffered and written as a shard of ``shard_size`` rows (or after ``flush_interval_s``,
  or at the end) with the store's atomic writer, then committed to ``store.json`` by the driver.

Why this is resumable and kill-safe: ids already listed in the store are skipped on the next run; a shard is
only visible after its commit, so a SIGKILL loses at most the unflushed buffer and the batches in flight, and
a shard file renamed into place but never committed is an orphan that the next run deletes (its ids were
not counted as embedded, so they are redone — never duplicated). Failed ids are *retried* on the next run
(a fixed file gets embedded), and recorded again if they still fail.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import sys
import time
import zlib
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from geoloc.config import EmbedConfig
from geoloc.devices import resolve_device
from geoloc.errors import ConfigError, StoreError
from geoloc.pipeline import readers
from geoloc.pipeline.backbones import Backbone, load_backbone
from geoloc.pipeline.engines import ENGINES, EngineOptions
from geoloc.pipeline.items import Failure, Item
from geoloc.pipeline.manifests import load_manifest
from geoloc.pipeline.store import BackboneInfo, FeatureStore, build_table, writer_lock

__all__ = [
    "EmbedConfig",
    "EmbedJob",
    "EmbedReport",
    "ItemSource",
    "ManifestSource",
    "ShardWriter",
    "run_embed",
]

_SET_LIMIT = 2_000_000  # above this many stored ids, skip lookups use the store's compact hashed index


# ---------------------------------------------------------------------------------------------- config/report
@dataclass
class EmbedReport:
    """What a run did. ``ok`` is false when the failure rate exceeds ``max_failure_rate``."""

    store: str
    backbone: str
    engine: str
    task: str
    already_in_store: int
    embedded: int
    failed: int
    shards: int
    rows_in_store: int
    elapsed_s: float
    max_failure_rate: float
    reasons: dict[str, int] = field(default_factory=dict)
    startup_s: float | None = None  # until the first batch reached the model (load, workers)
    steady_items_per_s: float | None = None  # after that

    @property
    def attempted(self) -> int:
        return self.embedded + self.failed

    @property
    def failure_rate(self) -> float:
        return self.failed / self.attempted if self.attempted else 0.0

    @property
    def items_per_s(self) -> float:
        return self.attempted / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failure_rate <= self.max_failure_rate

    def summary(self) -> str:
        lines = [
            f"embedded {self.embedded} item(s) with {self.backbone} into {self.store} "
            f"({self.shards} new shard(s), {self.rows_in_store} rows in the store; "
            f"{self.already_in_store} were already there)",
            f"failed {self.failed} item(s) ({100 * self.failure_rate:.2f}%, limit "
            f"{100 * self.max_failure_rate:.2f}%); {self.items_per_s:.1f} items/s over {self.elapsed_s:.1f} s"
            + (
                f" ({self.steady_items_per_s:.1f} items/s after {self.startup_s:.1f} s of start-up)"
                if self.steady_items_per_s is not None and self.startup_s is not None
                else ""
            ),
        ]
        for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"  {n:>8} × {reason}")
        if self.failed:
            lines.append(f"  list them: geoloc store failures {self.store}")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """Group failure reasons for the summary: drop the advice after ';', quoted values, paths and numbers."""
    head = reason.split(";", 1)[0]
    head = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", head)
    head = re.sub(
        r"\S*[/\\]\S*|\S+\.(?:jpe?g|png|webp|gif|tiff?|bmp|zip|tar|parquet)\b",
        "<file>",
        head,
        flags=re.IGNORECASE,
    )
    # Hex values (addresses, magic bytes) first: folding their digits one by one gave "NxNfNdNeNaN".
    head = re.sub(r"<[^<>]*\bat 0x[0-9a-fA-F]+>", "<object>", head)
    head = re.sub(r"\b0x[0-9a-fA-F]+\b", "<hex>", head)
    head = re.sub(r"\d+(?:\.\d+)?", "N", head)
    return head[:120]


# ---------------------------------------------------------------------------------------------- sources
class ItemSource(Protocol):
    """Where items come from; picklable (it is shipped to worker processes)."""

    name: str
    sha256: str
    label_columns: tuple[str, ...]
    kind_of_item: str

    def iter_items(self, skip_ids: Container[str] = ()) -> Iterator[Item | Failure]: ...

    def count(self) -> int | None: ...


@dataclass(frozen=True)
class ManifestSource:
    """A dataset manifest (and a choice of splits) as an :class:`ItemSource`."""

    manifest: Any  # geoloc.pipeline.manifests.Manifest
    splits: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    @property
    def label_columns(self) -> tuple[str, ...]:
        return tuple(self.manifest.label_columns)

    @property
    def kind_of_item(self) -> str:
        return self.manifest.kind_of_item

    @property
    def licence(self) -> str:
        return self.manifest.licence

    def iter_items(self, skip_ids: Container[str] = ()) -> Iterator[Item | Failure]:
        return readers.iter_items(self.manifest, self.splits, skip_ids=skip_ids)

    def count(self) -> int | None:
        return readers.count_items(self.manifest, self.splits)


def _owner(key: str, parts: int) -> int:
    """The partition that owns an id (stable across processes and Python versions, unlike ``hash``)."""
    return zlib.crc32(key.encode("utf-8")) % parts


class _PartitionSkip:
    """``skip_ids`` for one partition: ids already stored, and ids owned by other partitions.

    Because the reader consults ``skip_ids`` before reading bytes, partitions share the metadata scan but
    never read each other's images; and because a repeated id always hashes to the same partition, the
    reader's duplicate check still fires exactly once.
    """

    def __init__(self, existing: Container[str], part: int, parts: int) -> None:
        self.existing, self.part, self.parts = existing, part, parts

    def __contains__(self, ident: object) -> bool:
        if not isinstance(ident, str):
            return False
        return (self.parts > 1 and _owner(ident, self.parts) != self.part) or ident in self.existing


class _IndexContainer:
    """The store's compact hashed id index as a ``Container[str]`` (for stores with millions of ids)."""

    def __init__(self, index: Any) -> None:
        self.index = index

    def __contains__(self, ident: object) -> bool:
        return isinstance(ident, str) and bool(self.index.contains([ident])[0])


# ---------------------------------------------------------------------------------------------- records
@dataclass
class Prepared:
    """An item after decode + preprocess, ready to collate."""

    id: str
    split: str
    lat: float
    lon: float
    labels: dict[str, str | None]
    source: str
    x: Any


@dataclass
class Batch:
    """Collated prepared items plus the failures that travelled with them."""

    ids: list[str]
    splits: list[str]
    lat: list[float]
    lon: list[float]
    labels: list[dict[str, str | None]]
    sources: list[str]
    inputs: Any
    failures: list[Failure]

    def __len__(self) -> int:
        return len(self.ids) + len(self.failures)

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        if isinstance(self.inputs, torch.Tensor):
            self.inputs = self.inputs.pin_memory()
        elif isinstance(self.inputs, dict):
            self.inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        return self


@dataclass
class Mapped:
    """Embedded rows of one batch (float16 embeddings) plus its failures."""

    ids: list[str]
    splits: list[str]
    lat: np.ndarray
    lon: np.ndarray
    labels: list[dict[str, str | None]]
    sources: list[str]
    emb: np.ndarray
    failures: list[Failure]

    @property
    def records(self) -> int:
        return len(self.ids) + len(self.failures)

    def take(self, mask: np.ndarray) -> Mapped:
        idx = np.flatnonzero(mask)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return Mapped(
            pick(self.ids),
            pick(self.splits),
            self.lat[idx],
            self.lon[idx],
            pick(self.labels),
            pick(self.sources),
            self.emb[idx],
            [],
        )

    def fail(self, mask: np.ndarray, reason: str) -> list[Failure]:
        """Failures for the rows in ``mask`` (same id, split and source)."""
        return [
            Failure(id=self.ids[i], split=self.splits[i], source=self.sources[i], reason=reason)
            for i in np.flatnonzero(mask)
        ]


@dataclass
class Commit:
    """One writer flush: a shard and/or failures file to list, with the counts they carry."""

    shard: dict | None
    failures: dict | None
    rows: int
    failed: int
    records: int
    reasons: dict[str, int]


# ---------------------------------------------------------------------------------------------- mapper/writer
class _Mapper:
    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.first_call: float | None = None  # monotonic time of the first batch (start-up ends here)
        self.first_records = 0

    def __call__(self, batch: Batch) -> Mapped:
        if self.first_call is None:
            self.first_call, self.first_records = time.monotonic(), len(batch)
        failures = list(batch.failures)
        n = len(batch.ids)
        if n == 0:
            return Mapped(
                [],
                [],
                np.empty(0),
                np.empty(0),
                [],
                [],
                np.empty((0, self.backbone.dim), np.float16),
                failures,
            )
        emb = self.backbone.encode(batch.inputs).numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            emb16 = emb.astype(np.float16)
        ok = np.isfinite(emb16).all(axis=1)
        mapped = Mapped(
            list(batch.ids),
            list(batch.splits),
            np.asarray(batch.lat, np.float64),
            np.asarray(batch.lon, np.float64),
            list(batch.labels),
            list(batch.sources),
            emb16,
            [],
        )
        if not ok.all():
            failures += mapped.fail(
                ~ok,
                "the backbone produced a non-finite embedding (NaN/inf, or beyond "
                "float16 range); try --dtype fp32",
            )
            mapped = mapped.take(ok)
        mapped.failures = failures
        return mapped


class ShardWriter:
    """Buffers mapped rows and writes shard files of ``shard_rows`` rows (files only; the driver commits).

    It also drops ids it has already written or buffered (a failure "duplicate id"), so that one run can
    never produce a duplicate even if a source yields an id twice.
    """

    def __init__(
        self,
        store: FeatureStore,
        task: str,
        shard_rows: int,
        flush_interval_s: float,
        known: Any | None = None,
    ) -> None:
        self.store, self.task = store, task
        self.shard_rows, self.flush_interval_s = shard_rows, flush_interval_s
        self.known = known if known is not None else store.id_index()
        self.label_columns = store.label_columns
        self._parts: list[Mapped] = []
        self._rows = 0
        self._buffered: set[str] = set()
        self._failures: list[Failure] = []
        self._records = 0
        self._last_flush = time.monotonic()

    def add(self, mapped: Mapped) -> list[Commit]:
        self._records += mapped.records
        self._failures += mapped.failures
        if mapped.ids:
            dup = self.known.contains(mapped.ids) | np.array([i in self._buffered for i in mapped.ids])
            seen_here: set[str] = set()
            for k, ident in enumerate(mapped.ids):  # repeats inside the batch itself
                dup[k] |= ident in seen_here
                seen_here.add(ident)
            if dup.any():
                self._failures += mapped.fail(dup, "duplicate id: already embedded in this store or run")
                mapped = mapped.take(~dup)
            if mapped.ids:
                self._parts.append(mapped)
                self._rows += len(mapped.ids)
                self._buffered.update(mapped.ids)
        commits = []
        while self._rows >= self.shard_rows:
            commits.append(self._write(self.shard_rows))
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            commits += self.flush()
        return commits

    def flush(self) -> list[Commit]:
        """Write everything buffered (rows and failures); nothing if the buffer is empty."""
        if not self._rows and not self._failures and not self._records:
            return []
        return [self._write(self._rows)]

    def _write(self, n: int) -> Commit:
        shard = None
        if n:
            ids = [i for p in self._parts for i in p.ids]
            splits = [s for p in self._parts for s in p.splits]
            labels = [d for p in self._parts for d in p.labels]
            sources = [x for p in self._parts for x in p.sources]
            lat = np.concatenate([p.lat for p in self._parts])
            lon = np.concatenate([p.lon for p in self._parts])
            emb = np.concatenate([p.emb for p in self._parts])
            cols = {c: [d.get(c) for d in labels[:n]] for c in self.label_columns}
            table = build_table(ids[:n], splits[:n], lat[:n], lon[:n], emb[:n], cols, self.label_columns)
            shard = self.store.write_shard_file(table, self.task, known_ids=self.known)
            self.known.add(pa.array(ids[:n], pa.string()))
            rest = n < len(ids)
            self._parts = (
                [Mapped(ids[n:], splits[n:], lat[n:], lon[n:], labels[n:], sources[n:], emb[n:], [])]
                if rest
                else []
            )
            self._buffered.difference_update(ids[:n])
            self._rows -= n
        failures = self.store.write_failures_file(self._failures, self.task) if self._failures else None
        reasons = collections.Counter(_reason_kind(f.reason) for f in self._failures)
        commit = Commit(
            shard=shard,
            failures=failures,
            rows=n,
            failed=len(self._failures),
            records=self._records,
            reasons=dict(reasons),
        )
        self._failures, self._records = [], 0
        self._last_flush = time.monotonic()
        return commit


# ---------------------------------------------------------------------------------------------- the job
@dataclass
class _Tally:
    embedded: int = 0
    failed: int = 0
    shards: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)


@dataclass
class EmbedJob:
    """One embed run as the engines see it (see :class:`geoloc.pipeline.engines.Job`).

    Picklable: worker processes and Ray tasks get a copy without the driver's loaded model (``_backbone``),
    and build their own from ``backbone_name`` / ``weights`` / ``backbone_config`` in :meth:`build_mapper`.
    """

    source: Any
    skip: Container[str]
    store: FeatureStore
    backbone_name: str
    weights: str | Path | None
    backbone_config: Any
    preprocessor: Any
    collator: Any
    label_columns: tuple[str, ...]
    device: str
    dtype: str
    shard_rows: int
    flush_interval_s: float
    known: Any = None
    tally: _Tally = field(default_factory=_Tally)
    _backbone: Backbone | None = None
    _mapper: _Mapper | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # Never ship the model; the driver's id index and mapper stay home too.
        state.update(_backbone=None, known=None, _mapper=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # --- read / prepare / collate: worker side
    def read(self, part: int, parts: int) -> Iterator[Item | Failure]:
        skip = _PartitionSkip(self.skip, part, parts) if parts > 1 else self.skip
        for record in self.source.iter_items(skip_ids=skip):
            # Records without an id (e.g. an unreadable archive) are seen by every partition: one owns them.
            if parts > 1 and _owner(record.id or record.source, parts) != part:
                continue
            yield record

    def prepare(self, record: Item | Failure) -> Prepared | Failure:
        if isinstance(record, Failure):
            return record
        fail = lambda why: Failure(id=record.id, source=record.source, reason=why, split=record.split)  # noqa: E731
        lat, lon = record.lat, record.lon
        if not (
            isinstance(lat, (int, float))
            and isinstance(lon, (int, float))
            and math.isfinite(lat)
            and math.isfinite(lon)
            and abs(lat) <= 90
            and abs(lon) <= 180
        ):
            return fail(f"invalid coordinates lat={lat!r}, lon={lon!r}; need finite degrees in range")
        try:
            x = self.preprocessor(record.payload)
        except Exception as e:  # per-item boundary: anything wrong with one item is recorded, never fatal
            if isinstance(e, ValueError) and str(e):  # ImageDecodeError and text errors carry their reason
                return fail(str(e))
            return fail(f"preprocessing failed ({type(e).__name__}: {e})")
        labels = {c: record.labels.get(c) for c in self.label_columns}
        return Prepared(record.id, record.split, float(lat), float(lon), labels, record.source, x)

    def size_key(self, sample: Prepared | Failure) -> int:
        """A text's length in characters (padding follows it); 0 for images and failures (all one size)."""
        return len(sample.x) if isinstance(sample, Prepared) and isinstance(sample.x, str) else 0

    def collate(self, samples: Sequence[Prepared | Failure]) -> Batch:
        good = [s for s in samples if isinstance(s, Prepared)]
        bad = [s for s in samples if isinstance(s, Failure)]
        inputs = self.collator([s.x for s in good]) if good else None
        return Batch(
            [s.id for s in good],
            [s.split for s in good],
            [s.lat for s in good],
            [s.lon for s in good],
            [s.labels for s in good],
            [s.source for s in good],
            inputs,
            bad,
        )

    # --- map: where the model lives
    def build_mapper(self) -> _Mapper:
        backbone = self._backbone
        if backbone is None:
            backbone = load_backbone(self.backbone_name, self.weights, config=self.backbone_config)
            backbone.to(resolve_device(self.device), self.dtype)
        self._mapper = _Mapper(backbone)
        return self._mapper

    # --- write / commit
    def open_writer(self, task: str) -> ShardWriter:
        return ShardWriter(self.store, task, self.shard_rows, self.flush_interval_s, known=self.known)

    def commit(self, commits: Sequence[Commit]) -> None:
        for c in commits:
            self.store.commit([c.shard] if c.shard else [], [c.failures] if c.failures else [])
            self.tally.embedded += c.rows
            self.tally.failed += c.failed
            self.tally.shards += c.shard is not None
            self.tally.reasons.update(c.reasons)


# ---------------------------------------------------------------------------------------------- run
def _choose_backbone(config: EmbedConfig, source: Any) -> str:
    if config.backbone:
        return config.backbone
    manifest = Path(config.store) / "store.json"
    if manifest.exists():
        return FeatureStore.open(config.store).backbone.name
    return "minilm" if source.kind_of_item == "text" else "dinov2-l-reg"


def _check_same_weights(store_root: Path, info: BackboneInfo) -> None:
    """A store holds one vector space: same backbone *weights and preprocessing*, not just the same name.

    A store whose revision / preprocessing is unrecorded (e.g. imported features) cannot be checked and is
    accepted; ``FeatureStore.create`` still enforces the name and dimension.
    """
    if not (store_root / "store.json").exists():
        return
    have = FeatureStore.open(store_root).backbone
    if have.name != info.name:
        return  # FeatureStore.create reports this one
    if have.revision and have.revision != info.revision:
        raise StoreError(
            f"{store_root}: holds {info.name} embeddings of revision {have.revision!r}, but these "
            f"weights are {info.revision!r}; mixing them would mix vector spaces — use another --store"
        )
    if have.preprocessing and have.preprocessing != info.preprocessing:
        diff = sorted(
            k
            for k in set(have.preprocessing) | set(info.preprocessing)
            if have.preprocessing.get(k) != info.preprocessing.get(k)
        )
        raise StoreError(
            f"{store_root}: holds {info.name} embeddings made with different preprocessing "
            f"(differs in {diff}); use another --store"
        )


@contextlib.contextmanager
def _exclusive_job(store_root: Path, wait_s: float = 0.0) -> Iterator[None]:
    """One writing job per store at a time (:func:`geoloc.pipeline.store.writer_lock`, shared with
    ``store import``): two concurrent jobs would both write the ids missing when they started."""
    with writer_lock(store_root, "`geoloc embed`", wait_s=wait_s, notify=_tell):
        yield


def _tell(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _task_name() -> str:
    return f"embed-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"


def run_embed(config: EmbedConfig, source: ItemSource | None = None) -> EmbedReport:
    """Embed every item of the manifest that is not yet in the store; returns what happened.

    ``source`` replaces the manifest (tests, custom pipelines); ``config.manifest``, ``root``, ``splits``
    and ``limit`` are then unused. Raises :class:`~geoloc.errors.GeolocError` subclasses for problems with
    the run as a whole (manifest, backbone weights, incompatible store); per-item problems are failures.
    """
    config.validate()
    started = time.monotonic()
    if source is None:
        manifest = load_manifest(config.manifest, root=config.root, limit=config.limit)
        source = ManifestSource(manifest, tuple(config.splits) if config.splits else None)
    name = _choose_backbone(config, source)
    backbone = load_backbone(name, config.weights, config=config.backbone_config)
    if backbone.kind != source.kind_of_item:
        want = source.kind_of_item
        raise ConfigError(
            f"backbone {name!r} encodes {backbone.kind} but {source.name!r} holds {want} items; "
            f"pick {'an image' if want == 'image' else 'a text'} backbone with --backbone"
        )
    device = resolve_device(config.device)
    info = backbone.info()
    store_root = Path(config.store)
    _check_same_weights(store_root, info)
    if config.engine == "local":
        backbone.to(device, config.dtype)
    source_record = {
        "name": source.name,
        "kind": "embed",
        "manifest_sha256": source.sha256,
        "backbone_licence": backbone.licence,
        "engine": config.engine,
        "dtype": str(backbone.dtype).removeprefix("torch.") if config.engine == "local" else config.dtype,
    }
    with _exclusive_job(store_root, config.wait_s):
        store = FeatureStore.create(
            store_root, info, label_columns=source.label_columns, source=source_record
        )
        try:
            return _run_job(config, source, backbone, device, store, started)
        finally:
            store.close()


def _run_job(
    config: EmbedConfig,
    source: Any,
    backbone: Backbone,
    device: torch.device,
    store: FeatureStore,
    started: float,
) -> EmbedReport:
    known = store.id_index()
    already = len(known)
    skip: Container[str] = store.existing_ids() if already <= _SET_LIMIT else _IndexContainer(known)
    total = source.count()
    if total is not None:
        total = max(0, total - already)
    job = EmbedJob(
        source=source,
        skip=skip,
        store=store,
        backbone_name=backbone.name,
        weights=config.weights,
        backbone_config=config.backbone_config,
        preprocessor=backbone.preprocessor,
        collator=backbone.collator,
        label_columns=store.label_columns,
        device=config.device,
        dtype=config.dtype,
        shard_rows=config.shard_size,
        flush_interval_s=config.flush_interval_s,
        known=known,
        _backbone=backbone if config.engine == "local" else None,
    )
    cpus = os.cpu_count() or 1
    # Text needs no decoding worth a process: workers would only take cores from the model (and spawning
    # them costs seconds of imports). MiniLM on 2 cores: 5 s start-up and 426 names/s without workers, 10 s
    # and 393 names/s with two.
    default_workers = 0 if backbone.kind == "text" else min(4, cpus)
    workers = config.num_workers if config.num_workers is not None else default_workers
    task = _task_name()
    opts = EngineOptions(
        task=task,
        batch_size=config.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        shard_rows=config.shard_size,
        total=total,
        progress=config.progress,
        replicas=config.replicas,
        ray_address=config.ray_address,
        model_threads=max(1, cpus - workers) if device.type == "cpu" and workers else None,
    )
    try:
        ENGINES[config.engine](job, opts)
    finally:
        store.refresh()
    ended = time.monotonic()
    report = EmbedReport(
        store=str(store.root),
        backbone=backbone.name,
        engine=config.engine,
        task=task,
        already_in_store=already,
        embedded=job.tally.embedded,
        failed=job.tally.failed,
        shards=job.tally.shards,
        rows_in_store=store.num_rows(),
        elapsed_s=ended - started,
        max_failure_rate=config.max_failure_rate,
        reasons=dict(job.tally.reasons),
    )
    mapper = job._mapper  # set when the model ran in this process (local engine)
    if mapper is not None and mapper.first_call is not None:
        report.startup_s = mapper.first_call - started
        after = report.attempted - mapper.first_records
        report.steady_items_per_s = after / (ended - mapper.first_call) if after > 0 else None
    return report
