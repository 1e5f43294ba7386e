"""Feature store → torch batches: DuckDB reads, a seeded shuffle, partitions for DDP, exact resume.

This module is the training loader and its iterator; the row selection lives in
:mod:`geoloc.pipeline.selection`, the data order (plans, windows) in :mod:`geoloc.pipeline.shuffle`, the
background thread in :mod:`geoloc.pipeline.prefetch`, evaluation batches in
:mod:`geoloc.pipeline.eval_batches`.

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
  docs/reference-behaviour.md §2.1) and shuffles the resulting stream in windows of ``shuffle_buffer / S``
  rows: the Arrow chunks of a window are kept as they are and a seeded index permutation over the window
  decides the order in which its rows leave, each row copied once, straight into the batch. The windows are
  cut by row count, so the order does not depend on how DuckDB chunks its output, and each window has its own
  generator, so the order is a pure function of (seed, epoch, partition) —
  ``numpy.random.default_rng([seed, epoch, partition, ...])``.
- Several stores mix by weight = expected passes per epoch (the reference's combined set lists OSV-5M and
  iNat21 twice, docs/reference-behaviour.md §2.5: that is weight 2 here). An integer part k reads each shard k
  times; a fractional part f takes a seeded random ``round(f·rows)`` of the store's rows (spread over its
  shards by a multivariate hypergeometric draw), different every epoch.
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

import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from geoloc.errors import ConfigError, StoreError
from geoloc.pipeline.prefetch import Prefetcher
from geoloc.pipeline.selection import StoreSpec, select_stores
from geoloc.pipeline.shuffle import EpochPlan, PartitionReader, assign_partitions, plan_epoch
from geoloc.pipeline.sql import connect
from geoloc.pipeline.store import BackboneInfo

__all__ = ["FeatureLoader", "LoaderIterator", "StoreSpec"]

STATE_VERSION = 1


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
        batch_size, partitions, world_size, rank = (
            int(batch_size),
            int(partitions),
            int(world_size),
            int(rank),
        )
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if partitions <= 0:
            raise ConfigError(f"partitions must be positive, got {partitions}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % partitions:
            raise ConfigError(
                f"batch_size {batch_size} is not divisible by partitions {partitions}; use a batch "
                f"size that is a multiple of {partitions} (or fewer partitions)"
            )
        if partitions % world_size:
            raise ConfigError(
                f"partitions {partitions} is not divisible by world_size {world_size}; set "
                f"partitions to a multiple of the number of processes (e.g. {world_size})"
            )
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
        self._sel = select_stores(stores, split, where, expected_dim, expected_backbone)
        if len(self._sel.shards) < partitions:
            raise ConfigError(
                f"partitions {partitions} exceeds the {len(self._sel.shards)} shard(s) with selected rows; "
                f"use partitions <= {len(self._sel.shards)} (and a world size that divides it), "
                "or write the store in more, smaller shards"
            )
        self._groups = assign_partitions(self._sel.shards, partitions)
        self.sub_batch = batch_size // partitions
        per_rank = partitions // world_size
        self.local_partitions = range(rank * per_rank, (rank + 1) * per_rank)
        self.local_batch_size = self.sub_batch * per_rank
        # Unshuffled, a window only groups rows for the copy: one sub-batch of them is enough.
        self._window = max(self.shuffle_buffer // partitions if self.shuffle else 0, self.sub_batch)
        self._plans: dict[int, EpochPlan] = {}
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
            "split": self._sel.split,
            "where": self._sel.where,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        """JSON-able data provenance for a checkpoint's config.json."""
        return {
            "stores": [
                {
                    "path": str(spec.path.resolve()),
                    "weight": spec.weight,
                    "backbone": st.backbone.to_json(),
                    "shards": sum(1 for sh in self._sel.shards if sh.store == i),
                    "rows": rows,
                    "sources": st.sources,
                }
                for i, (spec, st, rows) in enumerate(
                    zip(self._sel.specs, self._sel.stores, self._sel.rows_per_store, strict=True)
                )
            ],
            "split": self.split,
            "where": self.where,
            "rows": self.num_rows,
            "batch_size": self.batch_size,
            "partitions": self.partitions,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "drop_last": self.drop_last,
            "batches_per_epoch": self.batches_per_epoch,
            "fingerprint": self.fingerprint(),
        }

    def __repr__(self) -> str:
        return (
            f"FeatureLoader({', '.join(map(str, self.stores))}, batch_size={self.batch_size}, "
            f"rows={self.num_rows}, dim={self.dim}, partitions={self.partitions}, "
            f"rank={self.rank}/{self.world_size})"
        )

    # ------------------------------------------------------------------ plan
    def _plan(self, epoch: int) -> EpochPlan:
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = plan_epoch(
                    self._sel,
                    self._groups,
                    seed=self.seed,
                    epoch=epoch,
                    shuffle=self.shuffle,
                    sub_batch=self.sub_batch,
                    drop_last=self.drop_last,
                )
                if len(self._plans) > 8:
                    self._plans.clear()
                self._plans[epoch] = plan
            return plan

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Where the consumer is: the epoch and the batches it has taken from it (JSON-serialisable)."""
        with self._lock:
            epoch, batch, total = self._epoch, self._batch, self._batches_total
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "batches_total": total,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "partitions": self.partitions,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "drop_last": self.drop_last,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict, *, strict: bool = True) -> None:
        """Continue exactly where ``state`` was taken: the next ``iter()`` yields the batches that would have
        come next. ``strict`` (default) refuses a state from different settings or different data, which
        could not reproduce the order; ``strict=False`` takes only the position."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"loader state version {state.get('version')!r} is not supported (expected {STATE_VERSION})"
            )
        if strict:
            for key in ("seed", "batch_size", "partitions", "shuffle", "shuffle_buffer", "drop_last"):
                if state.get(key) != getattr(self, key):
                    raise ConfigError(
                        f"cannot resume the data order: the saved loader had {key}={state.get(key)!r}, "
                        f"this one has {getattr(self, key)!r}; use the same setting "
                        "(or start a new run with --init-from)"
                    )
            if state.get("fingerprint") != self.fingerprint():
                raise StoreError(
                    "cannot resume the data order: the stores, split or where filter differ from the saved "
                    "run (shards added or changed?); resume on the same data, or fine-tune with --init-from"
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
        con = connect()
        try:
            while True:
                plan = self._plan(epoch)
                if skip >= plan.steps:  # the saved position was the end of an epoch
                    epoch, skip = epoch + 1, 0
                    if not self.shuffle:
                        return
                    continue
                readers = [
                    PartitionReader(
                        con.cursor(),
                        self._sel,
                        plan.pieces[p],
                        seed=self.seed,
                        epoch=epoch,
                        partition=p,
                        window=self._window,
                        shuffle=self.shuffle,
                        start=skip * self.sub_batch,
                    )
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

    def _batch_out(self, readers: Sequence[PartitionReader]) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = self.sub_batch, self.local_batch_size
        cond = torch.empty((n, self.dim), dtype=torch.float32, pin_memory=self.pin_memory)
        xyz = torch.empty((n, 3), dtype=torch.float32, pin_memory=self.pin_memory)
        cond_np, xyz_np = cond.numpy(), xyz.numpy()
        filled = [
            r.take(b, cond_np[i * b : (i + 1) * b], xyz_np[i * b : (i + 1) * b])
            for i, r in enumerate(readers)
        ]
        if all(f == b for f in filled):
            return cond, xyz
        keep = np.concatenate([np.arange(i * b, i * b + f) for i, f in enumerate(filled)]).astype(np.int64)
        idx = torch.from_numpy(keep)
        return cond[idx], xyz[idx]


class LoaderIterator:
    """The iterator ``iter(FeatureLoader)`` returns; ``close()`` (or dropping it) stops its thread."""

    def __init__(
        self,
        loader: FeatureLoader,
        generation: int,
        items: Iterator[tuple[torch.Tensor, torch.Tensor, int, int, int]],
        prefetch: int,
    ) -> None:
        self._loader = loader
        self._generation = generation
        self._items = Prefetcher(items, prefetch, name="geoloc-loader")

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        cond, xyz, epoch, k, steps = next(self._items)
        self._loader._advance(self._generation, epoch, k, steps)
        return cond, xyz

    def close(self) -> None:
        """Stop producing (idempotent); the background thread exits and its DuckDB reads are closed."""
        self._items.close()

    def __enter__(self) -> LoaderIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
