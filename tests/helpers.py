"""Shared test helpers: build realistic feature stores through the public store API.

``make_store`` writes what `geoloc embed` would write — several shards, several splits, label columns, a
failures file — with embeddings that actually depend on location (a fixed random projection of smooth
features of the coordinates plus noise), so a model trained on it can learn something in a few steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from geoloc.pipeline.items import Failure
from geoloc.pipeline.store import BackboneInfo, FeatureStore, build_table

__all__ = ["make_latlon", "make_store", "synthetic_embeddings"]

DEFAULT_SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
DEFAULT_LABELS = ("unique_country", "unique_city")


def make_latlon(n: int, rng: np.random.Generator, n_clusters: int = 12) -> np.ndarray:
    """(n, 2) degrees clustered around a few 'cities', like real photo locations (not uniform on S²)."""
    centres = np.stack([rng.uniform(-60, 70, n_clusters), rng.uniform(-180, 180, n_clusters)], 1)
    which = rng.integers(0, n_clusters, n)
    lat = np.clip(centres[which, 0] + rng.normal(0, 3.0, n), -89.9, 89.9)
    lon = (centres[which, 1] + rng.normal(0, 4.0, n) + 180.0) % 360.0 - 180.0
    return np.stack([lat, lon], 1)


def synthetic_embeddings(latlon: np.ndarray, dim: int, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """float32 (n, dim): a fixed random projection of Fourier features of the unit vector, plus noise."""
    rng = np.random.default_rng(seed + 7919)
    lat, lon = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
    xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1)
    freqs = rng.normal(0, 3.0, (3, 32))
    feats = np.concatenate([np.sin(xyz @ freqs), np.cos(xyz @ freqs), xyz], 1)
    proj = rng.normal(0, 1.0 / np.sqrt(feats.shape[1]), (feats.shape[1], dim))
    emb = feats @ proj + rng.normal(0, noise, (len(latlon), dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def _split_names(n: int, splits: Mapping[str, float] | Sequence[str], rng: np.random.Generator) -> np.ndarray:
    if isinstance(splits, str):
        splits = [splits]
    if not isinstance(splits, Mapping):
        splits = {s: 1.0 for s in splits}
    names = list(splits)
    p = np.asarray([float(splits[s]) for s in names])
    counts = np.floor(p / p.sum() * n).astype(int)
    counts[0] += n - counts.sum()
    out = np.repeat(np.asarray(names, dtype=object), counts)
    rng.shuffle(out)
    return out


def make_store(
    root: str | Path,
    n: int,
    dim: int,
    splits: Mapping[str, float] | Sequence[str] = DEFAULT_SPLITS,
    seed: int = 0,
    label_columns: Sequence[str] = DEFAULT_LABELS,
    backbone_name: str = "test",
    *,
    shards: int = 3,
    failures: int = 2,
    id_prefix: str = "img",
    task: str = "t0",
) -> FeatureStore:
    """Write an ``n``-row, ``dim``-d store at ``root`` and return it (open for writing).

    Args:
        splits: split name → fraction (or a list of names, equal fractions); rows are shuffled over splits.
        label_columns: string labels derived from the location (a coarse 'country' grid cell, a finer 'city'
            cell; any other name gets a 5°-cell label); one row in 20 has a null label.
        shards: rows are spread over this many shard files (fewer if ``n`` is small).
        failures: number of failure rows recorded (ids ``<prefix>-bad-<k>``), 0 for none.
    Ids are ``f"{id_prefix}{i:07d}"``; the embeddings come from :func:`synthetic_embeddings`.
    """
    rng = np.random.default_rng(seed)
    latlon = make_latlon(n, rng)
    emb = synthetic_embeddings(latlon, dim, seed=seed)
    split = _split_names(n, splits, rng)
    ids = np.asarray([f"{id_prefix}{i:07d}" for i in range(n)], dtype=object)
    labels: dict[str, list[str | None]] = {}
    for col in label_columns:
        cell = 20.0 if "country" in col else 2.0 if "city" in col else 5.0
        li = np.floor((latlon[:, 0] + 90) / cell).astype(int)
        lo = np.floor((latlon[:, 1] + 180) / cell).astype(int)
        vals: list[str | None] = [f"{col[:3]}-{a}-{b}" for a, b in zip(li, lo, strict=True)]
        for i in range(0, n, 20):
            vals[i] = None
        labels[col] = vals
    backbone = BackboneInfo(
        name=backbone_name, revision="test-rev", dim=dim, preprocessing={"kind": "synthetic", "seed": seed}
    )
    store = FeatureStore.create(
        root,
        backbone,
        label_columns=label_columns,
        source={"name": f"synthetic-{seed}", "kind": "embed", "manifest_sha256": ""},
    )
    bounds = np.linspace(0, n, max(1, min(shards, n)) + 1).astype(int)
    records = []
    for a, b in itertools.pairwise(bounds):
        if b <= a:
            continue
        table = build_table(
            ids[a:b],
            split[a:b],
            latlon[a:b, 0],
            latlon[a:b, 1],
            emb[a:b],
            {c: v[a:b] for c, v in labels.items()},
            label_columns,
        )
        records.append(store.write_shard_file(table, task))
    store.commit(records)
    if failures:
        store.write_failures(
            [
                Failure(
                    id=f"{id_prefix}-bad-{k}",
                    source=f"synthetic:{k}",
                    reason="corrupt image (synthetic)",
                    split="train",
                )
                for k in range(failures)
            ],
            task,
        )
    return store
