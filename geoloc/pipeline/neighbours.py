"""A faiss index over a store's training features, saved next to a checkpoint, queried in batches.

Why a file of its own: the hybrid model and the weighted-retrieval baseline both need the k most similar
training items of every query, and a hybrid checkpoint must say exactly which database it retrieves from.
The index is built once (``NeighbourIndex.build``), written with faiss's own format (``faiss.write_index``,
never pickle) beside the locations (``.npy``) and ids (Parquet), and implements the core's
:class:`geoloc.hybrid.NeighbourSearch` protocol, so the core only ever sees tensors.

Index kinds (all cosine similarity = inner product on L2-normalised float32 vectors):

- ``flat``: exact, 4·D bytes per item (1.5 KB at D = 384); right up to about a million items;
- ``ivf-sq8``: inverted lists over √N·4 centroids, 8-bit scalar-quantised vectors (D bytes per item),
  ``nprobe`` lists searched; the choice for OSV-5M's 4.9M × 1024 (≈ 5 GB instead of 20 GB);
- ``ivf-pq``: the same with product quantisation to ``D/16`` bytes per item (≈ 310 MB for OSV-5M), lossy;
- ``auto``: ``flat`` up to 1M items, ``ivf-sq8`` beyond.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from geoloc.errors import CheckpointError, ConfigError, InputError
from geoloc.files import atomic_write, atomic_write_text
from geoloc.hybrid import Neighbours
from geoloc.pipeline.eval_batches import iter_eval_batches
from geoloc.pipeline.store import FeatureStore
from geoloc.progress import progress_bar
from geoloc.sphere import latlon_to_xyz

__all__ = ["INDEX_KINDS", "NeighbourIndex", "store_identity"]

INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "ivf-sq8", "ivf-pq")
INDEX_FILE = "neighbours.faiss"
XYZ_FILE = "neighbours_xyz.npy"
IDS_FILE = "neighbours_ids.parquet"
META_FILE = "neighbours.json"
_AUTO_FLAT_MAX = 1_000_000
_TRAIN_SAMPLE = 100_000  # vectors used to train IVF centroids and quantisers


def store_identity(path: str | Path, split: str) -> dict[str, Any]:
    """What a hybrid checkpoint records about its database: path, backbone, rows of ``split`` and a sha256
    over the shards' own checksums (so a grown or re-embedded store is detected)."""
    st = FeatureStore.open(Path(path))
    recs = sorted(
        (r["file"], r.get("sha256", "")) for r in st.shard_records if r.get("splits", {}).get(split)
    )
    sha = hashlib.sha256(json.dumps(recs).encode()).hexdigest()
    return {
        "path": str(Path(path).resolve()),
        "split": split,
        "rows": st.num_rows(split),
        "backbone": st.backbone.to_json(),
        "shards_sha256": sha,
    }


def _factory(kind: str, n: int, dim: int) -> str:
    if kind == "auto":
        kind = "flat" if n <= _AUTO_FLAT_MAX else "ivf-sq8"
    if kind == "flat":
        return "Flat"
    nlist = max(1, min(65536, int(4 * math.sqrt(max(n, 1)))))
    if kind == "ivf-sq8":
        return f"IVF{nlist},SQ8"
    if kind == "ivf-pq":
        m = max(1, dim // 16)
        while dim % m:
            m -= 1
        return f"IVF{nlist},PQ{m}"
    raise ConfigError(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KINDS)}")


def _normalised(x: np.ndarray | torch.Tensor) -> np.ndarray:
    import faiss  # heavy optional dependency, loaded where an index is used

    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


@dataclass
class NeighbourIndex:
    """A faiss inner-product index with the locations ``xyz (N, 3)`` and ids of its rows.

    ``meta`` records the kind, factory string, database identity and build time; ``nprobe`` is the number of
    inverted lists an IVF index searches (ignored by ``flat``).
    """

    index: Any
    xyz: np.ndarray
    ids: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    nprobe: int = 32
    batch_size: int = 8192

    def __post_init__(self) -> None:
        if self.index.ntotal != len(self.xyz):
            raise InputError(
                f"neighbour index holds {self.index.ntotal} vectors but {len(self.xyz)} locations"
            )
        self._rows: dict[str, int] | None = None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    # --- building ---------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        features: np.ndarray | torch.Tensor,
        xyz: np.ndarray | torch.Tensor,
        ids: Sequence[str] | np.ndarray | None = None,
        kind: str = "auto",
    ) -> NeighbourIndex:
        """Index in-memory features ``(N, D)`` with unit-vector locations ``(N, 3)``."""
        import faiss

        t0 = time.perf_counter()
        x = _normalised(features)
        xyz = np.asarray(xyz.detach().cpu() if isinstance(xyz, torch.Tensor) else xyz, dtype=np.float32)
        fac = _factory(kind, len(x), x.shape[1])
        index = faiss.index_factory(x.shape[1], fac, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            sample = (
                x if len(x) <= _TRAIN_SAMPLE else x[np.sort(rng.choice(len(x), _TRAIN_SAMPLE, replace=False))]
            )
            index.train(sample)
        index.add(x)
        meta = {
            "kind": kind,
            "factory": fac,
            "rows": len(x),
            "dim": int(x.shape[1]),
            "build_s": time.perf_counter() - t0,
        }
        return cls(index, xyz, None if ids is None else np.asarray(ids, dtype=object), meta)

    @classmethod
    def build(
        cls,
        stores: Sequence[str | Path],
        split: str = "train",
        *,
        kind: str = "auto",
        batch_size: int = 65536,
        progress: bool = False,
    ) -> NeighbourIndex:
        """Stream ``split`` of the store(s) into an index (every row, store order)."""
        import faiss

        total = sum(FeatureStore.open(Path(s)).num_rows(split) for s in stores)
        if total == 0:
            raise ConfigError(f"no rows in split {split!r} of {[str(s) for s in stores]} to index")
        t0 = time.perf_counter()
        first = FeatureStore.open(Path(stores[0]))
        fac = _factory(kind, total, first.dim)
        index = faiss.index_factory(first.dim, fac, faiss.METRIC_INNER_PRODUCT)
        feats, xyz, ids = [], [], []
        bar = progress_bar(total, f"neighbour index ({split})", unit="item", enabled=progress)
        for batch in iter_eval_batches(list(stores), split, batch_size):
            x = _normalised(batch.cond)
            if index.is_trained:
                index.add(x)
            else:  # IVF: keep vectors until enough are seen to train the quantiser
                feats.append(x)
            xyz.append(latlon_to_xyz(np.asarray(batch.latlon, dtype=np.float64)).astype(np.float32))
            ids.append(np.asarray(batch.ids, dtype=object))
            bar.update(len(x))
            if not index.is_trained and sum(len(f) for f in feats) >= min(total, _TRAIN_SAMPLE):
                held = np.concatenate(feats)
                index.train(held[:_TRAIN_SAMPLE])
                index.add(held)
                feats = []
        bar.close()
        if feats:
            held = np.concatenate(feats)
            if not index.is_trained:
                index.train(held)
            index.add(held)
        meta = {
            "kind": kind,
            "factory": fac,
            "rows": int(index.ntotal),
            "dim": first.dim,
            "build_s": time.perf_counter() - t0,
            "stores": [store_identity(s, split) for s in stores],
        }
        return cls(index, np.concatenate(xyz), np.concatenate(ids), meta)

    # --- files --------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write the index, locations, ids and metadata into ``directory`` (each file atomically)."""
        import faiss

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        out = {
            "index": atomic_write(d / INDEX_FILE, lambda tmp: faiss.write_index(self.index, tmp)),
            "xyz": atomic_write(d / XYZ_FILE, self._write_xyz),
        }
        if self.ids is not None:
            table = pa.table({"id": pa.array([str(i) for i in self.ids], type=pa.string())})
            out["ids"] = atomic_write(d / IDS_FILE, lambda tmp: pq.write_table(table, tmp))
        meta = {**self.meta, "nprobe": self.nprobe, "files": {k: p.name for k, p in out.items()}}
        out["meta"] = atomic_write_text(d / META_FILE, json.dumps(meta, indent=2) + "\n")
        return out

    def _write_xyz(self, tmp: str) -> None:
        with open(tmp, "wb") as f:  # np.save(path) would append ".npy" to the temporary name
            np.save(f, self.xyz, allow_pickle=False)

    @classmethod
    def load(cls, directory: str | Path) -> NeighbourIndex:
        import faiss

        d = Path(directory)
        if not (d / INDEX_FILE).exists():
            raise CheckpointError(f"{d}: no {INDEX_FILE} (build it with geoloc.pipeline.fit_hybrid)")
        meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).exists() else {}
        index = faiss.read_index(str(d / INDEX_FILE))
        xyz = np.load(d / XYZ_FILE, allow_pickle=False)
        ids = None
        if (d / IDS_FILE).exists():
            ids = np.asarray(pq.read_table(d / IDS_FILE).column("id").to_pylist(), dtype=object)
        return cls(index, xyz, ids, meta, nprobe=int(meta.get("nprobe", 32)))

    # --- queries ------------------------------------------------------------------------------------------
    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """Database row of each id (−1 for ids not in the index)."""
        if self.ids is None:
            return np.full(len(ids), -1, dtype=np.int64)
        if self._rows is None:
            self._rows = {str(i): r for r, i in enumerate(self.ids)}
        return np.asarray([self._rows.get(str(i), -1) for i in ids], dtype=np.int64)

    def search(self, cond: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> Neighbours:
        """The ``k`` most similar rows of each query ``(B, D)``, in batches; ``exclude`` (B,) database rows
        to leave out (−1: none). Missing neighbours have sim −inf and index −1."""
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        q = _normalised(cond)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"queries of shape {q.shape} for a {self.dim}-d neighbour index")
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = self.nprobe
        ex = (
            None
            if exclude is None
            else np.asarray(
                exclude.detach().cpu() if isinstance(exclude, torch.Tensor) else exclude, dtype=np.int64
            )
        )
        extra = 0 if ex is None else 1
        sims = np.full((len(q), k), -np.inf, dtype=np.float32)
        idxs = np.full((len(q), k), -1, dtype=np.int64)
        for lo in range(0, len(q), self.batch_size):
            s, i = self.index.search(q[lo : lo + self.batch_size], k + extra)
            s = np.where(i >= 0, s, -np.inf)
            if ex is not None:
                drop = i == ex[lo : lo + self.batch_size, None]
                # Keep the first k that are not excluded: stable-sort the dropped ones to the end.
                order = np.argsort(drop, axis=1, kind="stable")
                s = np.take_along_axis(np.where(drop, -np.inf, s), order, 1)
                i = np.take_along_axis(np.where(drop, -1, i), order, 1)
            sims[lo : lo + len(s)] = s[:, :k]
            idxs[lo : lo + len(s)] = i[:, :k]
        xyz = self.xyz[np.clip(idxs, 0, None)]
        return Neighbours(torch.from_numpy(xyz), torch.from_numpy(sims), torch.from_numpy(idxs))
