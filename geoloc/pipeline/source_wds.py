"""Webdataset tar shards as an import source: per sample an embedding ``.npy``, a ``.json``, maybe a ``.cls``.

The only per-row Python path of an import, because a tar *is* a sequence of samples: members are grouped
into samples by :func:`geoloc.pipeline.tars.iter_tar_samples` (which also catches truncated shards), parsed
into a :class:`_SampleBuffer`, and handed on as one :class:`~geoloc.pipeline.source_common.Chunk` per
``chunk_rows`` samples. ``.npy`` headers are parsed once per layout, not once per sample.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from geoloc.config import ImportConfig
from geoloc.pipeline.items import Failure
from geoloc.pipeline.source_common import LAT_NAMES, LON_NAMES, Chunk, expand_source, label_names
from geoloc.pipeline.store import IdIndex
from geoloc.pipeline.tars import TarSample, TarSampleError, iter_tar_samples

__all__ = ["WdsSource"]


class WdsSource:
    """Webdataset tar shards: per sample an embedding ``.npy`` member, a ``.json`` and optionally a ``.cls``.

    Samples are consecutive members sharing a key (member path up to the first dot of its basename). The id
    is the JSON ``id`` (or ``--id-col`` key) when present, else the key's basename. Coordinates come from
    ``latitude``/``longitude`` (or ``lat``/``lon``); every ``unique_*`` key is kept as a label, ``.cls`` as
    the ``cls`` label. Tars are read front to back, never extracted or held whole in memory.
    """

    kind = "wds"
    skip_index: IdIndex | None = None  # unused: a tar stream has to be read through anyway

    def __init__(self, cfg: ImportConfig) -> None:
        self.cfg = cfg
        self.files = expand_source(cfg.source, (".tar", ".tgz", ".tar.gz"))
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
        """Add each sample of one shard to ``buf`` (yielding after each); an unreadable or truncated shard
        records the sample it was inside as failed, then one failure for the rest of the shard."""
        read = (self.emb_ext, "json", "cls")
        try:
            for sample in iter_tar_samples(path, read):
                buf.add(path, sample)
                yield
        except TarSampleError as e:
            if e.partial is not None:
                buf.add(path, e.partial, truncated=f"tar ended inside this sample ({e})")
            buf.failures.append(
                Failure(
                    id="",
                    source=f"{path}: after {e.last}",
                    split=self.cfg.split or "",
                    reason=f"unreadable tar data ({e.kind}: {e}); rest of shard skipped",
                )
            )


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

    def add(self, path: Path, sample: TarSample, truncated: str | None = None) -> None:
        src, cfg = self.src, self.src.cfg
        key, members = sample.key, sample.data
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
            have = sorted(sample.infos)
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
            src.label_candidates = label_names(list(seen), src.cfg.labels)
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
            labels={
                c: pa.array([lab.get(c) for lab in self.labels], type=pa.string())
                for c in src.label_candidates
            },
            split=(
                pa.array(self.splits, type=pa.string()) if any(s is not None for s in self.splits) else None
            ),
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
                raise ValueError(
                    f"{len(raw) - end} data bytes, expected {count * dtype.itemsize} (truncated?)"
                )
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
