"""Where an embed job runs: ``local`` (one process + DataLoader workers) or ``ray`` (Ray Data on a cluster).

An engine drives a :class:`Job` through the same four stages everywhere — *read* a partition of the dataset,
*prepare* each record (decode + preprocess, on CPU workers), *map* collated batches through the model (one
replica per process / GPU), *write* shard files — and hands every written shard back to the driver, which
commits it to the store manifest. Engines know nothing about images, models or Parquet: the job supplies
every stage, and records travel between stages as opaque Python objects. This is clip-retrieval's
reader / mapper / writer / distributor split, with the kill-safety of the store (files are invisible until
committed) doing the bookkeeping a distributor would otherwise need.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from geoloc.errors import ConfigError
from geoloc.progress import progress_bar

__all__ = ["ENGINES", "EngineOptions", "Job", "run_local", "run_ray"]


class Job(Protocol):
    """What an engine needs from a job. All but ``commit``/``progress`` must work in other processes."""

    def read(self, part: int, parts: int) -> Iterator[Any]:
        """Records of partition ``part`` of ``parts`` (disjoint, together the whole dataset)."""
        ...

    def prepare(self, record: Any) -> Any:
        """One record → a model-ready sample (or a failure record); CPU work, no model."""
        ...

    def collate(self, samples: Sequence[Any]) -> Any:
        """Samples → one batch (with a ``__len__`` = number of records it carries)."""
        ...

    def size_key(self, sample: Any) -> int:
        """How much padding a sample would force on its batch (e.g. a text's length; 0 when all samples are
        the same size). The local engine batches samples of similar size together."""
        ...

    def build_mapper(self) -> Callable[[Any], Any]:
        """Load the model where it will run; returns batch → mapped rows."""
        ...

    def open_writer(self, task: str) -> Any:
        """A writer with ``add(mapped) -> list[commit]`` and ``flush() -> list[commit]`` (files only)."""
        ...

    def commit(self, commits: Sequence[Any]) -> None:
        """Driver side: make written files visible and account for them."""
        ...


@dataclass(frozen=True)
class EngineOptions:
    """Execution knobs shared by the engines.

    Attributes:
        task: name stem for shard files written by this run.
        batch_size: records per model batch.
        num_workers: local engine: DataLoader worker processes (0 = decode in the main process).
        pin_memory: local engine: page-lock batches for fast host→GPU copies.
        shard_rows: rows per shard file (a writer flushes at this size, at a time limit, and at the end).
        total: expected number of records, for the progress bar (None = unknown).
        progress: show a progress bar.
        replicas: ray engine: model replicas (default: one per GPU, else one).
        read_parts: ray engine: read partitions (default: the cluster's CPU count).
        ray_address: ray engine: cluster to join (None = the running one, or start a local one).
        model_threads: local engine: torch threads for the model at the start (None = unchanged); on a CPU
            the caller leaves cores to the decode workers, and the engine then measures whether all
            threads are faster (see ``_ThreadBalance``).
    """

    task: str
    batch_size: int = 64
    num_workers: int = 0
    pin_memory: bool = False
    shard_rows: int = 50_000
    total: int | None = None
    progress: bool = True
    replicas: int | None = None
    read_parts: int | None = None
    ray_address: str | None = None
    model_threads: int | None = None


# ---------------------------------------------------------------------------------------------- local
class _Records(IterableDataset):
    """Each DataLoader worker reads and prepares its own partition of the job's records, and yields each
    ``window`` of them sorted by :meth:`Job.size_key`.

    Why: a batch is padded to its longest sample. Place names run from 3 to 40+ characters, so batches of
    names in table order carry about as much padding as text; sorted within windows of 16 batches, MiniLM
    embedded the same names 1.45x faster with identical vectors (the attention mask hides the padding).
    The sort is stable, so equal-size samples (images) keep their order; which rows land in which shard
    changes, nothing else (ids, not positions, identify rows).
    """

    def __init__(self, job: Job, window: int) -> None:
        super().__init__()
        self.job, self.window = job, max(1, window)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        part, parts = (0, 1) if info is None else (info.id, info.num_workers)
        held: list[Any] = []
        for record in self.job.read(part, parts):
            held.append(self.job.prepare(record))
            if len(held) >= self.window:
                yield from sorted(held, key=self.job.size_key)
                held = []
        yield from sorted(held, key=self.job.size_key)


def _worker_init(_: int) -> None:
    # Each worker is one decode stream: torch intra-op threads would only oversubscribe the cores that the
    # other workers and the model need.
    torch.set_num_threads(1)
    die_with_parent()


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker process when its parent dies, SIGKILL included.

    Without it a killed ``geoloc embed`` left its DataLoader workers running for minutes (~660 MB each,
    issue 11). A no-op elsewhere. If the parent died before the call, exit at once.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread, so it takes the Ctrl-C path (flush what is
    done, commit, release the lock) instead of dropping every buffered row."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


SORT_BATCHES = 16
"""The local engine sorts samples by size within windows of this many batches (see ``_Records``): enough
for batches of near-equal length, small enough that the first batch comes at once and a crash loses little."""


def run_local(job: Job, opts: EngineOptions) -> None:
    """Run the job in this process: DataLoader workers read + prepare, the main process maps and writes.

    On Ctrl-C or SIGTERM the rows embedded so far are flushed and committed before the interrupt propagates;
    on SIGKILL only the unflushed buffer is lost (the store never shows a partial shard).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers inside forked workers: no warning
    loader = DataLoader(
        _Records(job, SORT_BATCHES * opts.batch_size),
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
        collate_fn=job.collate,
        pin_memory=opts.pin_memory,
        worker_init_fn=_worker_init if opts.num_workers else None,
        prefetch_factor=4 if opts.num_workers else None,
        # Not fork: the main process has already run polars (manifest scans) and maybe tokenizers/CUDA,
        # whose thread pools do not survive a fork — forked workers then hang on their first scan.
        multiprocessing_context="spawn" if opts.num_workers else None,
    )
    threads = torch.get_num_threads()
    balance = _ThreadBalance(opts.model_threads, threads)
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_interrupt())
        stack.callback(torch.set_num_threads, threads)
        mapper = job.build_mapper()
        writer = job.open_writer(opts.task)
        with progress_bar(opts.total, "embed", enabled=opts.progress, smoothing=0.05) as bar:
            try:
                tick = time.perf_counter()
                for batch in loader:
                    got = time.perf_counter()
                    job.commit(writer.add(mapper(batch)))
                    bar.update(len(batch))
                    tick = balance.observe(got - tick, time.perf_counter() - got, len(batch))
            except KeyboardInterrupt:
                job.commit(writer.flush())
                raise
            job.commit(writer.flush())


class _ThreadBalance:
    """Share the CPU between decode workers and the model's intra-op threads, by measurement.

    The model starts with ``model_threads`` (the cores left after the workers). After a warm-up it times a
    few batches (seconds per record, waiting for data included) with that count and then with all
    ``full_threads``, and keeps the faster. Neither choice wins everywhere: a model-bound job leaves the
    workers idle on a full prefetch queue, so more threads help; but OpenMP threads that wait at a barrier for
    a descheduled sibling (busy workers, or other processes on the machine) can make a run several times
    slower than one thread — measured 14 vs 38 items/s for ViT-B/32 on a busy 2-core machine.
    """

    WARMUP, WINDOW = 2, 3

    def __init__(self, model_threads: int | None, full_threads: int) -> None:
        self.choices = [model_threads, full_threads] if model_threads and model_threads < full_threads else []
        if model_threads:
            torch.set_num_threads(model_threads)
        self.n = self.items = 0
        self.elapsed = 0.0
        self.costs: list[float] = []

    def observe(self, waited: float, worked: float, items: int) -> float:
        """Account one batch; returns the time stamp from which the next wait is measured."""
        if self.choices:
            self.n += 1
            if self.n > self.WARMUP:  # the first batches wait for worker start-up
                self.elapsed += waited + worked
                self.items += items
                if (self.n - self.WARMUP) % self.WINDOW == 0:
                    self.costs.append(self.elapsed / max(self.items, 1))
                    self.elapsed, self.items = 0.0, 0
                    if len(self.costs) < len(self.choices):
                        torch.set_num_threads(self.choices[len(self.costs)])
                    else:
                        torch.set_num_threads(self.choices[self.costs.index(min(self.costs))])
                        self.choices = []
        return time.perf_counter()


# ---------------------------------------------------------------------------------------------- ray
def _objects(values: Sequence[Any]) -> Any:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values) if values else []
    return out


class _RayRead:
    """flat_map UDF: partition number → that partition's records."""

    def __init__(self, job: Job, parts: int) -> None:
        self.job, self.parts = job, parts

    def __call__(self, row: dict) -> Iterator[dict]:
        for record in self.job.read(int(row["id"]), self.parts):
            yield {"obj": record}


class _RayPrepare:
    def __init__(self, job: Job) -> None:
        self.job = job

    def __call__(self, batch: dict) -> dict:
        return {"obj": _objects([self.job.prepare(r) for r in batch["obj"]])}


class _RayMap:
    """Actor: one model replica; collates and maps batches of prepared samples."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.mapper = job.build_mapper()

    def __call__(self, batch: dict) -> dict:
        return {"obj": _objects([self.mapper(self.job.collate(list(batch["obj"])))])}


class _RayWrite:
    """Actor: writes shard files from the mapped rows it receives; returns the commits to the driver."""

    def __init__(self, job: Job, task: str) -> None:
        self.writer = job.open_writer(f"{task}-{uuid.uuid4().hex[:8]}")

    def __call__(self, batch: dict) -> dict:
        commits: list[Any] = []
        for mapped in batch["obj"]:
            commits += self.writer.add(mapped)
        commits += self.writer.flush()  # a batch is ~one shard (see batch_size below): never hold rows
        return {"obj": _objects([commits])}


def run_ray(job: Job, opts: EngineOptions) -> None:
    """Run the job on Ray Data: read tasks → prepare tasks → model actors → writer actor → driver commits.

    One model replica per GPU when the cluster has GPUs (``num_gpus=1`` each), else ``replicas`` CPU
    actors. Shards are written by the writer actor with the same store code as the local engine; the driver
    commits each shard as soon as it arrives, so a killed driver loses only uncommitted shards (orphans,
    which the next run deletes and redoes). Needs the optional extra: ``pip install 'geoloc[ray]'``.
    """
    try:  # lazy: ray is an optional extra, heavy to import
        import ray
        import ray.data
        from ray.data import ActorPoolStrategy
    except ImportError as e:
        raise ConfigError("--engine ray needs Ray Data: pip install 'geoloc[ray]' (or 'ray[data]')") from e
    started_here = False
    if not ray.is_initialized():
        ray.init(
            address=opts.ray_address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False
        )
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        replicas = opts.replicas or max(1, gpus)
        parts = opts.read_parts or cpus
        per_replica = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        # from_items: the partition numbers are created on the driver, so no read task has to claim a CPU
        # that the actor pools below may already hold (on a 2-CPU node that deadlocks).
        ds = ray.data.from_items([{"id": k} for k in range(parts)], override_num_blocks=parts)
        ds = ds.flat_map(_RayRead(job, parts), num_cpus=0.5)
        ds = ds.map_batches(_RayPrepare(job), batch_size=opts.batch_size, num_cpus=0.5)
        ds = ds.map_batches(
            _RayMap,
            fn_constructor_args=(job,),
            batch_size=opts.batch_size,
            compute=ActorPoolStrategy(size=replicas),
            **per_replica,
        )
        # Each mapped row carries one batch, so this batch size makes one writer call ≈ one shard.
        ds = ds.map_batches(
            _RayWrite,
            fn_constructor_args=(job, opts.task),
            batch_size=max(1, math.ceil(opts.shard_rows / opts.batch_size)),
            compute=ActorPoolStrategy(size=1),
            num_cpus=0.1,
        )
        with progress_bar(opts.total, "embed (ray)", enabled=opts.progress) as bar:
            for row in ds.iter_rows():
                commits = row["obj"]
                job.commit(commits)
                bar.update(sum(getattr(c, "records", 0) for c in commits))
    finally:
        if started_here:
            with contextlib.suppress(Exception):
                ray.shutdown()


ENGINES: dict[str, Callable[[Job, EngineOptions], None]] = {"local": run_local, "ray": run_ray}
"""Registry: engine name → ``run(job, options)``."""
