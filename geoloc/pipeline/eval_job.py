"""`geoloc eval` as a library call: feature stores → batches → the core evaluator → report files.

The evaluator (core, :mod:`geoloc.evaluate`) never sees a store; this module is the boundary. It opens every
store once (:class:`EvalStores`), checks once that the rows were trained on the stores' backbone and that the
split exists, resolves the admin label columns, builds the table's rows (checkpoints and baselines; the
retrieval baseline's faiss index is filled from the training split here), streams the evaluated split with
``iter_eval_batches`` into :func:`geoloc.evaluate.evaluate`, and writes the outputs.

Data flow, one way: paths → :class:`EvalStores` → (rows, batches) → ``evaluate`` →
:class:`~geoloc.report.Report` → ``report.write``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoloc.checkpoint import read_config
from geoloc.config import BASELINES, EVAL_SPLIT, EvalConfig
from geoloc.devices import resolve_device
from geoloc.errors import BackboneError, ConfigError, StoreError
from geoloc.evaluate import as_rows, evaluate, resolve_labels
from geoloc.gazetteer import Gazetteer
from geoloc.geolocator import Geolocator
from geoloc.pipeline.eval_batches import EvalBatch, iter_eval_batches
from geoloc.pipeline.fit_hybrid import HYBRID_FILE, load_hybrid
from geoloc.pipeline.store import FeatureStore
from geoloc.predictors import (
    GeolocatorPredictor,
    HybridPredictor,
    Predictor,
    RetrievalBuilder,
    RetrievalPredictor,
    uniform_geolocator,
)
from geoloc.progress import progress_bar
from geoloc.report import Report

__all__ = [
    "EvalStores",
    "build_rows",
    "evaluate_stores",
    "is_hybrid",
    "retrieval_from_stores",
    "run_eval",
    "weighted_retrieval_row",
]


class EvalStores:
    """The feature stores of one evaluation, each opened once; every check and read goes through here."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        if not paths:
            raise ConfigError("no feature store given; pass --store PATH")
        self.paths = [Path(p) for p in paths]
        self.opened = [FeatureStore.open(p) for p in self.paths]

    @classmethod
    def of(cls, stores: EvalStores | str | Path | Sequence[str | Path]) -> EvalStores:
        """``stores`` as is when already opened, else open the path(s)."""
        if isinstance(stores, EvalStores):
            return stores
        return cls([stores] if isinstance(stores, (str, Path)) else list(stores))

    @property
    def backbone(self) -> tuple[str, int]:
        """``(name, dim)`` of the first store's embeddings (the loader refuses stores that disagree)."""
        bb = self.opened[0].backbone
        return bb.name, int(bb.dim)

    def check_backbone(self, expects: tuple[str | None, int | None], what: str) -> None:
        """Raise :class:`BackboneError` when a model's backbone ``(name, dim)`` differs from the store's."""
        have_name, have_dim = self.backbone
        name, dim = expects
        if (dim is not None and int(dim) != have_dim) or (name is not None and name != have_name):
            want = f"{name!r} {dim}-d" if name else f"{dim}-d"
            raise BackboneError(
                f"{what} expects {want} embeddings but store {self.paths[0]} holds "
                f"{have_name!r} {have_dim}-d ones; evaluate it on a store embedded with "
                f"{name or 'its backbone'}, or train a model on this store"
            )

    def require_split(self, split: str, what: str) -> None:
        """Raise :class:`StoreError` (listing the splits there are) when a store has no rows in ``split``."""
        for path, st in zip(self.paths, self.opened, strict=True):
            rows = st.rows_per_split()
            if not rows.get(split):
                have = (
                    ", ".join(f"{k} ({v:,})" for k, v in sorted(rows.items()) if v)
                    or "none (the store is empty)"
                )
                raise StoreError(
                    f"{path}: no rows in split {split!r} for the {what}; available splits: {have}"
                )

    def num_rows(self, split: str) -> int:
        return sum(st.num_rows(split) for st in self.opened)

    def label_columns(self) -> set[str]:
        """The label columns every store has."""
        cols = set(self.opened[0].label_columns)
        for st in self.opened[1:]:
            cols &= set(st.label_columns)
        return cols

    def batches(
        self, split: str, batch_size: int, where: str | None = None, label_columns: Sequence[str] = ()
    ) -> Iterator[EvalBatch]:
        """Every selected row of ``split`` once, in store order (the stores are not opened again)."""
        return iter_eval_batches(self.opened, split, batch_size, where, label_columns)

    def info(self) -> list[dict[str, Any]]:
        """What ``report.json`` records about each store."""
        return [
            {"path": str(p), "backbone": st.backbone.to_json(), "rows_per_split": st.rows_per_split()}
            for p, st in zip(self.paths, self.opened, strict=True)
        ]


def retrieval_from_stores(
    stores: EvalStores | str | Path | Sequence[str | Path],
    split: str = "train",
    *,
    index: str = "flat",
    batch_size: int = 65536,
    progress: bool = False,
) -> RetrievalPredictor:
    """The retrieval baseline over ``split`` of ``stores`` (every row, no filter), as a faiss index."""
    stores = EvalStores.of(stores)
    name, dim = stores.backbone
    builder = RetrievalBuilder(dim, index)
    stores.require_split(split, "retrieval database")
    with progress_bar(
        stores.num_rows(split), f"retrieval index ({split})", enabled=progress, leave=False
    ) as bar:
        for batch in stores.batches(split, batch_size):
            builder.add(batch.cond, batch.latlon)
            bar.update(len(batch))
    return builder.build(backbone=(name, dim), source=f"{','.join(str(p) for p in stores.paths)}:{split}")


def evaluate_stores(
    models: Any,
    stores: EvalStores | str | Path | Sequence[str | Path],
    split: str = EVAL_SPLIT,
    config: EvalConfig = EvalConfig(),
    *,
    gazetteer: Gazetteer | None = None,
    progress: bool = False,
) -> Report:
    """Evaluate one or more models on ``split`` of the feature store(s); one table row per model.

    Args:
        models: a :class:`~geoloc.geolocator.Geolocator`, a :class:`~geoloc.predictors.Predictor`, or a
            mapping row name → either (e.g. ``{"rfm": geo, "uniform": uniform_geolocator(dim)}``).
        stores: feature store path(s), or an :class:`EvalStores`; several stores are read one after the
            other (same backbone).
        gazetteer: a loaded :class:`~geoloc.gazetteer.Gazetteer` to reuse (else loaded when admin levels
            are scored).
        progress: show a progress bar on stderr.
    Raises:
        BackboneError: a model was trained on another backbone (name or dimension) than the store's.
        StoreError: the split is empty (the message lists the splits the store has).
        ConfigError: unknown label levels or columns.
    """
    stores = EvalStores.of(stores)
    rows = as_rows(models, config)
    for name, pred in rows.items():
        stores.check_backbone(pred.expects, f"model {name!r}")
    stores.require_split(split, "evaluation")
    levels, source = resolve_labels(config.labels, stores.label_columns())
    label_cols = sorted({c for c in levels.values() if c})
    total = None if config.where else stores.num_rows(split)
    batches = stores.batches(split, config.batch_size, config.where, label_cols)
    report = evaluate(
        rows,
        batches,
        config,
        levels=levels,
        label_source=source,
        gazetteer=gazetteer,
        progress=progress,
        total=total,
        desc=f"eval {split}",
    )
    report.split = split
    report.stores = stores.info()
    return report


def _estimators(config: EvalConfig) -> tuple[str, ...]:
    return tuple(config.estimators) or (config.estimator,)


def _row_names(
    checkpoints: Sequence[str | Path], baselines: Sequence[str], estimators: Sequence[str]
) -> list[str]:
    """One name per (checkpoint, estimator) — ``model[estimator]`` when there are several — then baselines."""
    items = [Path(c).resolve().name or str(c) for c in checkpoints]
    if len(estimators) > 1:
        items = [f"{c}[{e}]" for c in items for e in estimators]
    names: list[str] = []
    for item in [*items, *baselines]:
        name, k = item, 2
        while name in names:
            name, k = f"{item}-{k}", k + 1
        names.append(name)
    return names


def is_hybrid(ckpt: str | Path) -> bool:
    """A hybrid checkpoint is a folder with ``hybrid.json`` (see :mod:`geoloc.pipeline.fit_hybrid`)."""
    return (Path(ckpt) / HYBRID_FILE).is_file()


def _checkpoint_rows(
    ckpt: str | Path, stores: EvalStores, config: EvalConfig, estimators: Sequence[str]
) -> list[Predictor]:
    """One row per estimator of one checkpoint (the weights are loaded once)."""
    configs = [replace(config, estimator=e, estimators=()) for e in estimators]
    if is_hybrid(ckpt):
        hybrid = load_hybrid(ckpt, device=str(resolve_device(config.device)))
        rows: list[Predictor] = [HybridPredictor(hybrid, c, source=str(ckpt)) for c in configs]
        stores.check_backbone(rows[0].expects, f"hybrid checkpoint {ckpt}")
        return rows
    cfg = read_config(ckpt)
    bb = cfg.get("backbone") or {}
    # Check before loading weights: the config alone says which embeddings the model was trained on.
    stores.check_backbone(
        (bb.get("name") or None, int(bb.get("dim") or cfg.get("cond_dim") or 0) or None), f"checkpoint {ckpt}"
    )
    geo = Geolocator.from_pretrained(ckpt, device=resolve_device(config.device))
    return [GeolocatorPredictor(geo, c, source=str(ckpt)) for c in configs]


def _hybrid_retrieval_fit(checkpoints: Sequence[str | Path]) -> dict[str, Any] | None:
    """The weighted-retrieval ``k`` / ``tau`` that a hybrid checkpoint of this run fitted on its val split."""
    for ckpt in checkpoints:
        if is_hybrid(ckpt):
            doc = json.loads((Path(ckpt) / HYBRID_FILE).read_text())
            fit = doc.get("retrieval") or {}
            if "k" in fit and "tau" in fit:
                how = f"validation fit of {ckpt} ({(doc.get('fitted_on') or {}).get('items', '?')} items)"
                return {
                    "k": int(fit["k"]),
                    "tau": float(fit["tau"]),
                    "geoscore": fit.get("geoscore"),
                    "how": how,
                }
    return None


def weighted_retrieval_row(
    base: RetrievalPredictor, config: EvalConfig, checkpoints: Sequence[str | Path] = ()
) -> RetrievalPredictor:
    """The weighted-neighbour row over ``base``'s index: ``k`` / ``tau`` from the config, else from a hybrid
    checkpoint's validation fit, else chosen by GeoScore on ``retrieval_val_items`` random database items
    (leave-one-out) — never on the evaluated split."""
    if config.retrieval_k is not None and config.retrieval_tau is not None:
        return base.weighted(config.retrieval_k, config.retrieval_tau, {"how": "given"})
    fit = _hybrid_retrieval_fit(checkpoints)
    if fit is not None:
        return base.weighted(fit["k"], fit["tau"], fit)
    n = int(base.index.ntotal)
    rows = np.sort(np.random.default_rng(0).choice(n, size=min(n, config.retrieval_val_items), replace=False))
    cond = torch.from_numpy(np.stack([base.index.reconstruct(int(r)) for r in rows]))
    return base.fit_weights(cond, rows)


def _baseline_row(
    base: str,
    stores: EvalStores,
    config: EvalConfig,
    split: str,
    progress: bool,
    cache: dict[str, RetrievalPredictor],
    checkpoints: Sequence[str | Path],
) -> Predictor:
    if base == "uniform":
        return GeolocatorPredictor(
            uniform_geolocator(stores.backbone[1]), config, kind="uniform", source="uniform on S²"
        )
    if config.retrieval_split == split:
        raise ConfigError(
            f"retrieval over split {split!r} would find every item itself; set another "
            "--retrieval-split (the training split)"
        )
    if "index" not in cache:  # the 1-NN and weighted rows share one index
        cache["index"] = retrieval_from_stores(
            stores, config.retrieval_split, index=config.retrieval_index, progress=progress
        )
    if base == "retrieval-weighted":
        return weighted_retrieval_row(cache["index"], config, checkpoints)
    return cache["index"]


def _check_request(checkpoints: Sequence[str | Path], baselines: Sequence[str]) -> None:
    """The request's own mistakes, found before any store is opened."""
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(
            f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)} "
            "(a vmf / vmf-mix model is a checkpoint: pass it with --checkpoint)"
        )
    if not checkpoints and not baselines:
        raise ConfigError("nothing to evaluate: pass --checkpoint DIR and/or --baseline uniform|retrieval")


def build_rows(
    stores: EvalStores | str | Path | Sequence[str | Path],
    checkpoints: Sequence[str | Path] = (),
    baselines: Sequence[str] = (),
    config: EvalConfig = EvalConfig(),
    *,
    split: str = EVAL_SPLIT,
    progress: bool = False,
) -> dict[str, Predictor]:
    """Load checkpoints (flows, vMFs, hybrids: a folder with ``hybrid.json``) — one row per estimator of
    ``config.estimators`` — and build baselines (``uniform``, ``retrieval``, ``retrieval-weighted``) as named
    table rows, in order.

    A row is a name and a :class:`~geoloc.predictors.Predictor`; a new kind of row is one more entry here.
    """
    _check_request(checkpoints, baselines)
    stores = EvalStores.of(stores)
    estimators = _estimators(config)
    names = iter(_row_names(checkpoints, baselines, estimators))
    rows: dict[str, Predictor] = {}
    for ckpt in checkpoints:
        for pred in _checkpoint_rows(ckpt, stores, config, estimators):
            rows[next(names)] = pred
    cache: dict[str, RetrievalPredictor] = {}
    for base in baselines:
        rows[next(names)] = _baseline_row(base, stores, config, split, progress, cache, checkpoints)
    return rows


def run_eval(
    stores: str | Path | Sequence[str | Path],
    split: str = EVAL_SPLIT,
    *,
    checkpoints: Sequence[str | Path] = (),
    baselines: Sequence[str] = (),
    config: EvalConfig = EvalConfig(),
    out_dir: str | Path | None = None,
    csv: bool = False,
    plots: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Report:
    """``geoloc eval`` as one call: open the stores, build the rows, evaluate them in one pass, write the
    outputs to ``out_dir``."""
    _check_request(checkpoints, baselines)
    opened = EvalStores.of(stores)
    rows = build_rows(opened, checkpoints, baselines, config, split=split, progress=progress)
    report = evaluate_stores(rows, opened, split, config, progress=progress)
    if out_dir is not None:
        written = report.write(out_dir, csv=csv, plots=plots)
        if log:
            for kind, path in written.items():
                log(f"wrote {kind:<15} {path}")
    return report
