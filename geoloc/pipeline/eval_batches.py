"""Evaluation batches: every selected row of the stores exactly once, in order, with ids and labels.

Unlike training (:mod:`geoloc.pipeline.loader`) evaluation needs no shuffle, weights or resume, but it needs
the row ids and label columns, and ground truth in degrees. Rows are selected exactly as for training
(:mod:`geoloc.pipeline.selection`), so ``--split`` / ``--where`` mean the same in both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from geoloc.errors import ConfigError, StoreError
from geoloc.pipeline.selection import (
    READ_ROWS,
    Selection,
    StoreSpec,
    batch_arrays,
    check_coordinates,
    query_error,
    select_stores,
)
from geoloc.pipeline.sql import connect, files_sql, quote_ident, where_sql
from geoloc.pipeline.store import FeatureStore
from geoloc.sphere import latlon_to_xyz

__all__ = ["EvalBatch", "iter_eval_batches", "read_tensors"]


@dataclass
class EvalBatch:
    """One evaluation batch: ids, the condition, ground-truth degrees and the requested label columns."""

    ids: list[str]
    cond: torch.Tensor  # (B, dim) float32
    latlon: np.ndarray  # (B, 2) float64 degrees
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B,) object array (None = missing)

    def __len__(self) -> int:
        return len(self.ids)


def iter_eval_batches(
    stores: Sequence[str | Path | StoreSpec | FeatureStore] | str | Path,
    split: str | None,
    batch_size: int,
    where: str | None = None,
    label_columns: Sequence[str] = (),
    *,
    expected_dim: int | None = None,
    expected_backbone: str | None = None,
) -> Iterator[EvalBatch]:
    """Every selected row exactly once, in store then shard order, in batches of ``batch_size`` (the last
    one may be shorter). Weights are ignored. Rows with NaN/out-of-range coordinates raise StoreError."""
    if isinstance(stores, (str, Path, StoreSpec)):
        stores = [stores]
    if int(batch_size) <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    sel = select_stores(stores, split, where, expected_dim, expected_backbone)
    label_columns = tuple(label_columns)
    for spec, st in zip(sel.specs, sel.stores, strict=True):
        missing = [c for c in label_columns if c not in st.label_columns]
        if missing:
            raise StoreError(
                f"{spec.path}: no label column(s) {missing} (the store has "
                f"{list(st.label_columns)}); evaluate without them or use another store"
            )
    return _eval_batches(sel, int(batch_size), label_columns)


def _eval_batches(sel: Selection, batch_size: int, label_columns: tuple[str, ...]) -> Iterator[EvalBatch]:
    con = connect()
    labels_sql = "".join(f", {quote_ident(c)}" for c in label_columns)
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    try:
        for sh in sel.shards:
            q = (
                f"SELECT id, lat, lon{labels_sql}, emb::FLOAT[{sel.dim}] AS emb "
                f"FROM read_parquet({files_sql([sh.path])}){where_sql(sel.split, sel.where)}"
            )
            try:
                reader = con.sql(q).to_arrow_reader(READ_ROWS)
            except Exception as e:
                raise query_error(e, sel.specs[sh.store].path, sel.where) from e
            offset = 0
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                lat, lon, _ = batch_arrays(batch.select(["lat", "lon", "emb"]), sel, sh, sel.dim)
                check_coordinates(lat, lon, sel, sh, offset)
                offset += batch.num_rows
                pending.append(batch)
                pending_rows += batch.num_rows
                while pending_rows >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield _eval_batch(table.slice(0, batch_size), sel.dim, label_columns)
                    rest = table.slice(batch_size)
                    pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows:
            yield _eval_batch(pa.Table.from_batches(pending), sel.dim, label_columns)
    finally:
        con.close()


def _eval_batch(table: pa.Table, dim: int, label_columns: tuple[str, ...]) -> EvalBatch:
    # One copy of the embeddings (Arrow chunks → one contiguous, writable array); labels via Arrow's C++.
    cond = np.concatenate(
        [c.flatten().to_numpy(zero_copy_only=False).reshape(len(c), dim) for c in table.column("emb").chunks]
    ).astype(np.float32, copy=False)
    lat = table.column("lat").to_numpy()
    lon = table.column("lon").to_numpy()
    labels = {
        c: table.column(c).to_numpy(zero_copy_only=False).astype(object, copy=False) for c in label_columns
    }
    return EvalBatch(
        ids=table.column("id").to_pylist(),
        cond=torch.from_numpy(cond),
        latlon=np.stack([lat, lon], axis=1).astype(np.float64),
        labels=labels,
    )


def read_tensors(
    stores: Sequence[str | Path | StoreSpec | FeatureStore] | str | Path,
    split: str | None = "train",
    where: str | None = None,
    *,
    expected_dim: int | None = None,
    expected_backbone: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every selected row in memory, as ``(cond (N, dim) float32, xyz (N, 3) float32)``, in store order.

    For small stores and for benchmarks that compare training from memory with training from the loader.
    """
    conds, xyzs = [], []
    for batch in iter_eval_batches(
        stores, split, 65536, where, expected_dim=expected_dim, expected_backbone=expected_backbone
    ):
        conds.append(batch.cond)
        xyzs.append(latlon_to_xyz(torch.from_numpy(batch.latlon)).to(torch.float32))
    return torch.cat(conds), torch.cat(xyzs)
