"""``evaluate``: the paper's metrics for geolocators and baselines on a feature-store split, in one pass.

Why a driver of its own: the published numbers depend on protocol details that are easy to get wrong
(eval-protocol.md §7): every test item is scored (no dropped last batch), the point is one guided sample
(ω = 2, 250 Euler steps), a failed (NaN) prediction is a miss and is counted, admin labels come from the
reverse_geocoder nearest place, RFM numbers are mean ± std over seeds. This module does the streaming and the
bookkeeping; the formulas live in :mod:`geoloc.metrics`, the labels in :mod:`geoloc.gazetteer`, and the
tables, files and plots in :mod:`geoloc.report`.

How it runs: the split is read once with ``pipeline.loader.iter_eval_batches`` (every row, in store order).
Each batch goes to every *row* of the table — a checkpoint, the uniform baseline, nearest-neighbour
retrieval over the training features — which predicts it once per seed (each seed has its own generator
that carries over from batch to batch), and once computes the exact log-density of the true location (NLL,
ω = 0) and, if asked, the localizability. After the pass :func:`score_rows` turns the per-item arrays into
metrics; it takes plain arrays, so precomputed predictions go through exactly the same code
(``bench/bench_eval.py``).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig
from geoloc.errors import BackboneError, ConfigError, InputError, StoreError
from geoloc.metrics import COMPAT_MODES, Nll, localizability_stats, nll_bits_per_dim, prdc, score
from geoloc.sphere import latlon_to_xyz, xyz_to_latlon

if TYPE_CHECKING:
    from geoloc.gazetteer import Gazetteer
    from geoloc.geolocator import Geolocator
    from geoloc.metrics import Scores

__all__ = [
    "BASELINES",
    "ESTIMATOR_CHOICES",
    "EvalConfig",
    "EvalData",
    "GeolocatorPredictor",
    "Predictor",
    "Report",
    "RetrievalPredictor",
    "RowPredictions",
    "RowResult",
    "check_backbone",
    "evaluate",
    "resolve_labels",
    "run_eval",
    "score_rows",
    "uniform_geolocator",
]

ESTIMATOR_CHOICES: tuple[str, ...] = ("sample", "median", "geoscore", "mode", "best-of-n", "mean")
BASELINES: tuple[str, ...] = ("uniform", "retrieval")
LABEL_MODES: tuple[str, ...] = ("auto", "none", "latlon")
RETRIEVAL_INDEXES: tuple[str, ...] = ("flat", "hnsw")
TABLE_LAYOUTS: tuple[str, ...] = ("auto", "osv5m", "yfcc4k", "full")


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate. Defaults are the published protocol (eval-protocol.md §7).

    Prediction: ``estimator`` (``sample`` = one guided draw, the paper's Table 1; ``median``, ``geoscore``,
    ``mode``, ``best-of-n``, ``mean`` from ``n`` draws, see ``estimators.py``), ``omega`` (None: 2 for
    ``sample``, 0 otherwise), ``steps``/``method`` of the sampler, one prediction set per seed in ``seeds``.
    Data: ``batch_size`` items per step, ``where`` (SQL filter on the split), ``drop_tail`` (> 0: score only
    the first ⌊N/drop_tail⌋·drop_tail items, PLONK's single-device loader, quirk E; 0 scores every item).
    Labels: ``labels`` is ``"auto"`` (OSV-5M's ``unique_<level>`` columns when the store has them),
    ``"none"``, ``"latlon"`` (ground-truth keys from the true coordinates by the same nearest-place rule), or
    a mapping level → column name. ``compat``: ``fixed`` (every item counts, a failure is a miss) or
    ``plonk`` (the reference's quirks, see ``metrics.py``).
    Extras: NLL of the true location (``nll``, integrated with ``likelihood``, ω = 0 by default), the
    localizability from ``localizability_n`` exact samples (costly, off by default), PRDC with ``prdc_k``
    neighbours over ``prdc_chunks`` chunks and unchunked. Retrieval reads ``retrieval_split`` into a faiss
    ``retrieval_index`` (``flat`` exact inner product, or ``hnsw`` for big stores).
    ``gazetteer_cache``: folder of the cached H3 label table (default ``~/.cache/geoloc``); without a
    cached table labels come from the exact KD-tree (same labels, slower on millions of points).
    """

    estimator: str = "sample"
    n: int = 256
    omega: float | None = None
    steps: int = 250
    method: str = "euler"
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 4096
    where: str | None = None
    drop_tail: int = 0
    compat: str = "fixed"
    labels: str | Mapping[str, str] = "auto"
    nll: bool = True
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    localizability: bool = False
    localizability_n: int = 64
    prdc: bool = True
    prdc_k: int = 3
    prdc_chunks: int = 20
    retrieval_split: str = "train"
    retrieval_index: str = "flat"
    device: str = "cpu"
    table: str = "auto"
    gazetteer_cache: str | None = None

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATOR_CHOICES:
            raise ConfigError(f"unknown estimator {self.estimator!r}; choose from {', '.join(ESTIMATOR_CHOICES)}")
        if self.compat not in COMPAT_MODES:
            raise ConfigError(f"unknown compat mode {self.compat!r}; choose from {', '.join(COMPAT_MODES)}")
        if not self.seeds:
            raise ConfigError("give at least one seed (e.g. --seeds 0,1,2)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds repeat: {list(self.seeds)}; give distinct seeds")
        for name in ("n", "steps", "batch_size", "localizability_n", "prdc_k", "prdc_chunks"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.drop_tail < 0:
            raise ConfigError(f"drop_tail must be ≥ 0 (0 scores every item), got {self.drop_tail}")
        if isinstance(self.labels, str) and self.labels not in LABEL_MODES:
            raise ConfigError(f"labels must be one of {', '.join(LABEL_MODES)} or a LEVEL=COLUMN mapping, "
                              f"got {self.labels!r}")
        if self.retrieval_index not in RETRIEVAL_INDEXES:
            raise ConfigError(f"unknown retrieval index {self.retrieval_index!r}; choose from "
                              f"{', '.join(RETRIEVAL_INDEXES)}")
        if self.table not in TABLE_LAYOUTS:
            raise ConfigError(f"unknown table layout {self.table!r}; choose from {', '.join(TABLE_LAYOUTS)}")

    def effective_omega(self) -> float:
        """The guidance the point estimate uses: ``omega``, else 2 for ``sample`` and 0 for the others."""
        if self.omega is not None:
            return float(self.omega)
        return 2.0 if self.estimator == "sample" else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["labels"] = self.labels if isinstance(self.labels, str) else dict(self.labels)
        d["omega_effective"] = self.effective_omega()
        return d


# ---------------------------------------------------------------------------------------------------------------
# Predictors: the rows of the table
# ---------------------------------------------------------------------------------------------------------------


class Predictor(Protocol):
    """What :func:`evaluate` needs from a row of the table.

    ``predict`` returns ``(B, 2)`` float64 degrees with NaN rows for failed predictions; ``log_prob`` the
    natural-log density of the true points ``xyz (B, 3)`` (or None: no density); ``localizability`` bits per
    item (or None). ``deterministic`` predictors are run for the first seed only. ``expects`` is the
    backbone the predictor was built for, ``(name or None, dim or None)``, checked against the store.
    """

    deterministic: bool
    nll_space: str | None

    @property
    def expects(self) -> tuple[str | None, int | None]: ...

    def info(self) -> dict[str, Any]: ...

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray: ...

    def log_prob(self, xyz: torch.Tensor, cond: torch.Tensor) -> np.ndarray | None: ...

    def localizability(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None: ...

    def generator(self, seed: int) -> torch.Generator: ...


class GeolocatorPredictor:
    """A :class:`~geoloc.geolocator.Geolocator` with the evaluation's estimator, guidance and sampler."""

    deterministic = False

    def __init__(self, geo: Geolocator, config: EvalConfig, *, kind: str = "checkpoint", source: str = "") -> None:
        from geoloc.estimators import ESTIMATORS

        # A shallow copy, so the evaluation's sampler settings do not leak into the caller's object.
        self.geo = copy.copy(geo)
        self.geo.sample_config = replace(geo.sample_config, steps=config.steps, method=config.method)
        self.geo.likelihood_config = config.likelihood
        self.config = config
        self.kind, self.source = kind, source
        self.omega = config.effective_omega()
        self.nll_space = geo.family.nll_space()
        self._estimator = None if config.estimator == "sample" else ESTIMATORS[config.estimator]

    @property
    def expects(self) -> tuple[str | None, int | None]:
        bb = self.geo.backbone
        return (bb.get("name") or None), int(self.geo.cond_dim)

    def info(self) -> dict[str, Any]:
        cfg = self.geo.config
        return {
            "kind": self.kind,
            "source": self.source,
            "family": self.geo.family.name,
            "backbone": self.geo.backbone or None,
            "train_steps": (cfg.get("train") or {}).get("steps") if isinstance(cfg.get("train"), dict) else None,
            "estimator": self.config.estimator,
            "omega": self.omega,
            "steps": self.config.steps,
            "method": self.config.method,
            "n": None if self.config.estimator == "sample" else self.config.n,
            # vMF families answer "sample" with their mean direction (# reference differs: a random draw).
            "point": "mean direction" if self.config.estimator == "sample" and _has_closed_form_point(self.geo)
            else None,
        }

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.geo.device).manual_seed(int(seed))

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray:
        if self._estimator is None:
            out = self.geo.predict(cond, estimator="sample", omega=self.omega, generator=generator).latlon
            return out.detach().to("cpu", torch.float64).numpy()
        # Not Geolocator.predict: it raises on a batch holding one non-finite draw, and one bad item must
        # become one counted miss, not a lost batch. Items with a non-finite draw are the failures.
        samples = self.geo.sample(cond, self.config.n, omega=self.omega, generator=generator)
        ok = torch.isfinite(samples).all(dim=-1).all(dim=-1)
        out = np.full((samples.shape[0], 2), np.nan)
        if bool(ok.any()):
            good = samples[ok]
            lp = None
            if self._estimator.log_prob == "required":
                c = cond.to(samples.device, torch.float32)[ok].repeat_interleave(self.config.n, dim=0)
                lp = self.geo.log_prob(good.reshape(-1, 3), c).reshape(good.shape[:2])
            point = self._estimator(good, lp)
            out[ok.cpu().numpy()] = xyz_to_latlon(point).detach().to("cpu", torch.float64).numpy()
        return out

    def log_prob(self, xyz: torch.Tensor, cond: torch.Tensor) -> np.ndarray | None:
        return self.geo.log_prob(xyz, cond).detach().to("cpu", torch.float64).numpy()

    def localizability(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None:
        loc = self.geo.localizability(cond, n=self.config.localizability_n, generator=generator)
        return loc.detach().to("cpu", torch.float64).numpy()


def _has_closed_form_point(geo: Geolocator) -> bool:
    from geoloc.families import Family

    return type(geo.family).point is not Family.point


def uniform_geolocator(cond_dim: int) -> Geolocator:
    """The uniform distribution on S² as a Geolocator (the paper's "Uniform" row); nothing to load."""
    from geoloc.geolocator import Geolocator

    return Geolocator.build(FamilyConfig(name="uniform"), ModelConfig(), int(cond_dim),
                            config={"family": {"name": "uniform"}, "cond_dim": int(cond_dim)})


class RetrievalPredictor:
    """Nearest-neighbour retrieval (the paper's "retrieval" row): the location of the most similar training
    embedding by cosine similarity (faiss inner product on L2-normalised float32 vectors).

    ``flat`` is exact; ``hnsw`` (M = 32, efSearch = 128) is approximate and much faster on millions of rows.
    """

    deterministic = True
    nll_space = None

    def __init__(self, index: Any, latlon: np.ndarray, *, backbone: tuple[str | None, int | None],
                 source: str = "", kind: str = "flat") -> None:
        if index.ntotal != len(latlon):
            raise InputError(f"retrieval index holds {index.ntotal} vectors but {len(latlon)} locations")
        self.index, self.latlon = index, np.asarray(latlon, dtype=np.float64)
        self._backbone, self.source, self.index_kind = backbone, source, kind

    @classmethod
    def from_stores(
        cls,
        stores: Sequence[str | Path],
        split: str = "train",
        *,
        index: str = "flat",
        batch_size: int = 65536,
        progress: bool = False,
    ) -> RetrievalPredictor:
        """Stream ``split`` of ``stores`` into a faiss index (every row, no filter)."""
        import faiss

        from geoloc.pipeline.loader import iter_eval_batches
        from geoloc.pipeline.store import FeatureStore

        if index not in RETRIEVAL_INDEXES:
            raise ConfigError(f"unknown retrieval index {index!r}; choose from {', '.join(RETRIEVAL_INDEXES)}")
        first = FeatureStore.open(Path(stores[0]))
        _require_split(stores, split, "retrieval database")
        dim = first.dim
        if index == "hnsw":
            idx = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = 80
            idx.hnsw.efSearch = 128
        else:
            idx = faiss.IndexFlatIP(dim)
        latlon = []
        bar = _progress(progress, sum(FeatureStore.open(Path(s)).num_rows(split) for s in stores),
                        f"retrieval index ({split})")
        for batch in iter_eval_batches(list(stores), split, batch_size):
            x = np.ascontiguousarray(batch.cond.numpy(), dtype=np.float32)
            faiss.normalize_L2(x)
            idx.add(x)
            latlon.append(batch.latlon)
            bar.update(len(batch))
        bar.close()
        return cls(idx, np.concatenate(latlon), backbone=(first.backbone.name, dim),
                   source=f"{','.join(str(s) for s in stores)}:{split}", kind=index)

    @property
    def expects(self) -> tuple[str | None, int | None]:
        return self._backbone

    def info(self) -> dict[str, Any]:
        return {"kind": "retrieval", "source": self.source, "index": self.index_kind,
                "database_rows": int(self.index.ntotal), "estimator": "nearest neighbour (cosine)"}

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(seed))

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray:
        import faiss

        q = np.ascontiguousarray(cond.detach().to("cpu", torch.float32).numpy())
        faiss.normalize_L2(q)
        _, nn_idx = self.index.search(q, 1)
        hit = nn_idx[:, 0]
        out = np.full((len(q), 2), np.nan)
        ok = hit >= 0  # faiss answers -1 when it finds nothing (an empty HNSW neighbourhood)
        out[ok] = self.latlon[hit[ok]]
        return out

    def log_prob(self, xyz: torch.Tensor, cond: torch.Tensor) -> np.ndarray | None:
        return None

    def localizability(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Checks at the boundary
# ---------------------------------------------------------------------------------------------------------------


def check_backbone(expects: tuple[str | None, int | None], what: str, store_path: str | Path) -> None:
    """Raise :class:`BackboneError` when a model's backbone (name, dim) differs from the store's."""
    from geoloc.pipeline.store import FeatureStore

    bb = FeatureStore.open(Path(store_path)).backbone
    name, dim = expects
    if (dim is not None and int(dim) != bb.dim) or (name is not None and name != bb.name):
        want = f"{name!r} {dim}-d" if name else f"{dim}-d"
        raise BackboneError(
            f"{what} expects {want} embeddings but store {store_path} holds {bb.name!r} {bb.dim}-d ones; "
            f"evaluate it on a store embedded with {name or 'its backbone'}, or train a model on this store"
        )


def _require_split(stores: Sequence[str | Path], split: str, what: str) -> None:
    from geoloc.pipeline.store import FeatureStore

    for s in stores:
        rows = FeatureStore.open(Path(s)).rows_per_split()
        if not rows.get(split):
            have = ", ".join(f"{k} ({v:,})" for k, v in sorted(rows.items()) if v) or "none (the store is empty)"
            raise StoreError(f"{s}: no rows in split {split!r} for the {what}; available splits: {have}")


def resolve_labels(labels: str | Mapping[str, str], stores: Sequence[str | Path]) -> tuple[dict[str, str | None], str | None]:
    """Admin levels to score and where their ground truth comes from: ``({level: column or None}, source)``.

    ``source`` is ``"columns"``, ``"latlon"`` or None (no admin metrics). A mapping is checked against the
    published levels and against the label columns that every store has.
    """
    from geoloc.gazetteer import LEVELS
    from geoloc.pipeline.store import FeatureStore

    columns = None
    for s in stores:
        cols = set(FeatureStore.open(Path(s)).label_columns)
        columns = cols if columns is None else columns & cols
    columns = columns or set()
    if isinstance(labels, str):
        if labels == "none":
            return {}, None
        if labels == "latlon":
            return {lv: None for lv in LEVELS}, "latlon"
        if labels == "auto":
            found = {lv: f"unique_{lv}" for lv in LEVELS if f"unique_{lv}" in columns}
            return found, ("columns" if found else None)
        raise ConfigError(f"labels must be one of {', '.join(LABEL_MODES)} or LEVEL=COLUMN pairs, got {labels!r}")
    out: dict[str, str | None] = {}
    for lv, col in labels.items():
        if lv not in LEVELS:
            raise ConfigError(f"unknown label level {lv!r} in --labels; choose from {', '.join(LEVELS)}")
        if col not in columns:
            raise ConfigError(
                f"unknown label column {col!r} for level {lv!r}; the store(s) have "
                f"{sorted(columns) or 'no label columns'}; pass --labels LEVEL=COLUMN with one of them"
            )
        out[lv] = col
    return out, ("columns" if out else None)


# ---------------------------------------------------------------------------------------------------------------
# Data of one pass
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """Ground truth of the evaluated items: ids, ``latlon (N, 2)`` degrees, and the admin ground truth.

    ``levels`` maps each scored level to its label column (None when ``label_source`` is ``"latlon"``);
    ``gt_keys`` holds the column values per level (object arrays, None = missing).
    """

    ids: np.ndarray
    latlon: np.ndarray
    levels: dict[str, str | None] = field(default_factory=dict)
    label_source: str | None = None
    gt_keys: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.latlon)

    def head(self, n: int) -> EvalData:
        return EvalData(self.ids[:n], self.latlon[:n], self.levels, self.label_source,
                        {k: v[:n] for k, v in self.gt_keys.items()})


@dataclass
class RowPredictions:
    """One row's per-item outputs: a ``(N, 2)`` prediction per seed, and the seed-free extras."""

    name: str
    info: dict[str, Any]
    seeds: list[int]
    latlon: list[np.ndarray]
    log_prob: np.ndarray | None = None
    nll_space: str | None = None
    localizability: np.ndarray | None = None
    elapsed_s: float = 0.0

    def head(self, n: int) -> RowPredictions:
        return replace(self, latlon=[p[:n] for p in self.latlon],
                       log_prob=None if self.log_prob is None else self.log_prob[:n],
                       localizability=None if self.localizability is None else self.localizability[:n])


class _RowState:
    """Accumulates one predictor's outputs over the batches of the pass."""

    def __init__(self, name: str, predictor: Predictor, config: EvalConfig) -> None:
        self.name, self.predictor, self.config = name, predictor, config
        self.seeds = list(config.seeds[:1] if predictor.deterministic else config.seeds)
        self.generators = [predictor.generator(s) for s in self.seeds]
        # Localizability has its own stream, so turning it on does not change the predictions.
        self.loc_generator = predictor.generator(config.seeds[0] + 7_919) if config.localizability else None
        self.preds: list[list[np.ndarray]] = [[] for _ in self.seeds]
        self.log_prob: list[np.ndarray] = []
        self.loc: list[np.ndarray] = []
        self.has_lp = config.nll
        self.has_loc = config.localizability
        self.elapsed = 0.0

    def consume(self, cond: torch.Tensor, xyz: torch.Tensor) -> None:
        t0 = time.perf_counter()
        for k, g in enumerate(self.generators):
            p = np.asarray(self.predictor.predict(cond, g), dtype=np.float64)
            if p.shape != (cond.shape[0], 2):
                raise InputError(f"row {self.name!r}: predictor returned shape {p.shape} for {cond.shape[0]} items")
            self.preds[k].append(p)
        if self.has_lp:
            lp = self.predictor.log_prob(xyz, cond)
            if lp is None:
                self.has_lp = False
            else:
                self.log_prob.append(np.asarray(lp, dtype=np.float64).reshape(-1))
        if self.has_loc:
            loc = self.predictor.localizability(cond, self.loc_generator)
            if loc is None:
                self.has_loc = False
            else:
                self.loc.append(np.asarray(loc, dtype=np.float64).reshape(-1))
        self.elapsed += time.perf_counter() - t0

    def result(self) -> RowPredictions:
        def cat(parts: list[np.ndarray], width: int | None = None) -> np.ndarray:
            if parts:
                return np.concatenate(parts)
            return np.empty((0, width) if width else (0,))

        return RowPredictions(
            name=self.name,
            info=self.predictor.info(),
            seeds=self.seeds,
            latlon=[cat(p, 2) for p in self.preds],
            log_prob=cat(self.log_prob) if self.has_lp else None,
            nll_space=self.predictor.nll_space if self.has_lp else None,
            localizability=cat(self.loc) if self.has_loc else None,
            elapsed_s=self.elapsed,
        )


def _progress(enabled: bool, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total or None, desc=desc, unit="item", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _as_rows(models: Any, config: EvalConfig) -> dict[str, Predictor]:
    from geoloc.geolocator import Geolocator

    if not isinstance(models, Mapping):
        models = {"model": models}
    if not isinstance(models, Mapping) or not models:
        raise ConfigError("nothing to evaluate: give at least one checkpoint or baseline")
    out: dict[str, Predictor] = {}
    for name, m in models.items():
        out[str(name)] = GeolocatorPredictor(m, config, source=str(name)) if isinstance(m, Geolocator) else m
    return out


def evaluate(
    models: Any,
    stores: str | Path | Sequence[str | Path],
    split: str = "test",
    config: EvalConfig = EvalConfig(),
    *,
    gazetteer: Gazetteer | None = None,
    progress: bool = False,
) -> Report:
    """Evaluate one or more models on ``split`` of the feature store(s); one table row per model.

    Args:
        models: a :class:`~geoloc.geolocator.Geolocator`, a :class:`Predictor`, or a mapping row name →
            either (e.g. ``{"rfm": geo, "uniform": uniform_geolocator(dim), "retrieval": retriever}``).
        stores: feature store path(s); several stores are read one after the other (same backbone).
        gazetteer: a loaded :class:`~geoloc.gazetteer.Gazetteer` to reuse (else loaded when admin levels
            are scored).
        progress: show progress bars on stderr.
    Raises:
        BackboneError: a model was trained on another backbone (name or dimension) than the store's.
        StoreError: the split is empty (the message lists the splits the store has).
        ConfigError: unknown label levels or columns.
    """
    from geoloc.pipeline.loader import iter_eval_batches
    from geoloc.pipeline.store import FeatureStore

    stores = [stores] if isinstance(stores, (str, Path)) else list(stores)
    if not stores:
        raise ConfigError("no feature store given; pass --store PATH")
    rows = _as_rows(models, config)
    for name, pred in rows.items():
        check_backbone(pred.expects, f"model {name!r}", stores[0])
    _require_split(stores, split, "evaluation")
    levels, source = resolve_labels(config.labels, stores)
    label_cols = sorted({c for c in levels.values() if c})

    states = [_RowState(name, pred, config) for name, pred in rows.items()]
    device = torch.device(config.device if config.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    ids: list[np.ndarray] = []
    latlon: list[np.ndarray] = []
    labels: dict[str, list[np.ndarray]] = {c: [] for c in label_cols}
    total = None if config.where else sum(FeatureStore.open(Path(s)).num_rows(split) for s in stores)
    bar = _progress(progress, total, f"eval {split}")
    t0 = time.perf_counter()
    for batch in iter_eval_batches(stores, split, config.batch_size, config.where, label_cols):
        ids.append(np.asarray(batch.ids, dtype=object))
        latlon.append(batch.latlon)
        for c in label_cols:
            labels[c].append(batch.labels[c])
        cond = batch.cond.to(device)
        xyz = latlon_to_xyz(torch.from_numpy(batch.latlon)).to(device=device, dtype=torch.float32)
        for st in states:
            st.consume(cond, xyz)
        bar.update(len(batch))
    bar.close()
    data = EvalData(
        ids=np.concatenate(ids),
        latlon=np.concatenate(latlon),
        levels=levels,
        label_source=source,
        gt_keys={lv: np.concatenate(labels[c]) for lv, c in levels.items() if c},
    )
    results = [st.result() for st in states]
    report = score_rows(data, results, config, gazetteer=gazetteer)
    report.split = split
    report.stores = [_store_info(s) for s in stores]
    report.elapsed_s = time.perf_counter() - t0
    return report


def _store_info(path: str | Path) -> dict[str, Any]:
    from geoloc.pipeline.store import FeatureStore

    st = FeatureStore.open(Path(path))
    return {"path": str(path), "backbone": st.backbone.to_json(), "rows_per_split": st.rows_per_split()}


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RowResult:
    """Metrics of one row. ``metrics[key]`` lists one value per seed (keys of ``Scores.as_dict`` plus PRDC:
    ``precision`` … ``coverage`` over ``prdc_chunks`` chunks, ``precision_unchunked`` …)."""

    name: str
    info: dict[str, Any]
    seeds: list[int]
    metrics: dict[str, list[float]]
    nll: Nll | None
    nll_space: str | None
    localizability: dict[str, Any] | None
    n_unmatchable: dict[str, int]
    elapsed_s: float
    scores: list[Scores] = field(repr=False, default_factory=list)
    predictions: RowPredictions | None = field(repr=False, default=None)

    def stat(self, key: str) -> tuple[float, float]:
        """``(mean, std)`` of a metric over seeds (sample std, 0 for a single seed); NaN when absent."""
        vals = [v for v in self.metrics.get(key, []) if v is not None and math.isfinite(v)]
        if not vals:
            return float("nan"), float("nan")
        return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        summary = {}
        for k, vals in self.metrics.items():
            m, s = self.stat(k)
            summary[k] = {"mean": m, "std": s, "values": list(vals)}
        return {
            "name": self.name,
            **{k: v for k, v in self.info.items() if v is not None},
            "seeds": self.seeds,
            "metrics": summary,
            "n_failed_total": int(sum(self.metrics.get("n_failed", []))),
            "nll": None if self.nll is None else {"bits_per_dim": self.nll.bits_per_dim, "n": self.nll.n,
                                                  "n_failed": self.nll.n_failed, "space": self.nll_space},
            "localizability": self.localizability,
            "admin_unmatchable": self.n_unmatchable,
            "elapsed_s": self.elapsed_s,
        }


@dataclass
class Report:
    """Everything one ``geoloc eval`` run measured. ``to_json()`` is ``report.json``; :mod:`geoloc.report`
    writes the tables, per-item files and plots (:meth:`write`)."""

    config: EvalConfig
    n: int
    n_read: int
    levels: dict[str, str | None]
    label_source: str | None
    rows: list[RowResult]
    data: EvalData = field(repr=False)
    label_keys: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    split: str = ""
    stores: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> RowResult:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows are {[r.name for r in self.rows]}")

    def to_json(self) -> dict[str, Any]:
        from geoloc import __version__

        return _clean({
            "format": "geoloc-eval",
            "version": 1,
            "geoloc": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "split": self.split,
            "stores": self.stores,
            "n": self.n,
            "n_read": self.n_read,
            "levels": self.levels,
            "label_source": self.label_source,
            "config": self.config.to_json(),
            "rows": [r.to_json() for r in self.rows],
            "notes": self.notes,
            "elapsed_s": self.elapsed_s,
        })

    def table_markdown(self, layout: str | None = None) -> str:
        from geoloc.report import format_tables

        return format_tables(self, layout or self.config.table)

    def write(self, out_dir: str | Path, *, csv: bool = False, plots: bool = True) -> dict[str, Path]:
        from geoloc.report import write_outputs

        return write_outputs(self, out_dir, csv=csv, plots=plots)


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf → None, numpy scalars → Python, tuples → lists, dict keys → str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _load_gazetteer(cache_dir: str | None) -> Gazetteer:
    """The cached H3 table when there is one (fast); otherwise the exact KD-tree (same labels)."""
    from geoloc.gazetteer import Gazetteer

    try:
        return Gazetteer.load(cache_dir=cache_dir, build=False)
    except StoreError:
        return Gazetteer.load(table=False)


def _prdc_metrics(gt: np.ndarray, pred: np.ndarray, config: EvalConfig, notes: list[str], name: str) -> dict[str, float]:
    """PRDC on the items with a prediction (the reference drops failures too), chunked and unchunked."""
    from geoloc.metrics import failed_predictions

    ok = ~failed_predictions(pred)
    real, fake = gt[ok], pred[ok]
    out: dict[str, float] = {}
    for suffix, chunks in (("", config.prdc_chunks), ("_unchunked", None)):
        try:
            p = prdc(real, fake, k=config.prdc_k, chunks=chunks)
        except InputError as e:
            note = f"{name}: PRDC{suffix or f' ({config.prdc_chunks} chunks)'} skipped: {e}"
            if note not in notes:
                notes.append(note)
            continue
        out.update({f"{k}{suffix}": v for k, v in p.as_dict().items()})
    return out


def score_rows(
    data: EvalData,
    rows: Sequence[RowPredictions],
    config: EvalConfig = EvalConfig(),
    *,
    gazetteer: Gazetteer | None = None,
) -> Report:
    """Metrics of every row from per-item arrays (the second half of :func:`evaluate`; usable on its own).

    Per row and seed: ``metrics.score`` (distances, GeoScore, thresholds, admin accuracy) and PRDC; per
    row: NLL in bits/dim of the true locations and the localizability statistics (against the first seed's
    errors).
    """
    n_read = len(data)
    notes: list[str] = []
    if config.drop_tail:
        keep = (n_read // config.drop_tail) * config.drop_tail
        notes.append(f"drop_tail={config.drop_tail}: scored the first {keep:,} of {n_read:,} items "
                     "(PLONK's single-device loader, quirk E)")
        data = data.head(keep)
        rows = [r.head(keep) for r in rows]
    n = len(data)
    if n == 0:
        raise StoreError("no items to score (the split is empty, or drop_tail is larger than it)")
    levels = list(data.levels)
    if levels and gazetteer is None:
        gazetteer = _load_gazetteer(config.gazetteer_cache)
    gt_keys = data.gt_keys if data.label_source == "columns" else None
    results: list[RowResult] = []
    for row in rows:
        metrics: dict[str, list[float]] = {}
        scores = []
        for pred in row.latlon:
            if len(pred) != n:
                raise InputError(f"row {row.name!r}: {len(pred)} predictions for {n} items")
            sc = score(pred, data.latlon, gazetteer=gazetteer, levels=levels, gt_keys=gt_keys,
                       compat=config.compat)
            values = dict(sc.as_dict())
            if config.prdc:
                values.update(_prdc_metrics(data.latlon, pred, config, notes, row.name))
            for k, v in values.items():
                metrics.setdefault(k, []).append(v if isinstance(v, int) else float(v))
            scores.append(sc)
        nll = None if row.log_prob is None else nll_bits_per_dim(row.log_prob, dim=3)
        loc = None
        if row.localizability is not None:
            loc = localizability_stats(row.localizability, scores[0].per_item["dist_km"])
        unmatchable = dict(scores[0].admin.n_unmatchable) if scores and scores[0].admin is not None else {}
        results.append(RowResult(row.name, row.info, list(row.seeds), metrics, nll, row.nll_space, loc,
                                 unmatchable, row.elapsed_s, scores, row))
    label_keys = {lv: gazetteer.keys[lv] for lv in levels} if levels and gazetteer is not None else {}
    return Report(config=config, n=n, n_read=n_read, levels=dict(data.levels), label_source=data.label_source,
                  rows=results, data=data, label_keys=label_keys, notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# The command's one call
# ---------------------------------------------------------------------------------------------------------------


def _row_names(checkpoints: Sequence[str | Path], baselines: Sequence[str]) -> list[str]:
    names: list[str] = []
    for item in [*(Path(c).resolve().name or str(c) for c in checkpoints), *baselines]:
        name, k = item, 2
        while name in names:
            name, k = f"{item}-{k}", k + 1
        names.append(name)
    return names


def build_rows(
    stores: Sequence[str | Path],
    checkpoints: Sequence[str | Path] = (),
    baselines: Sequence[str] = (),
    config: EvalConfig = EvalConfig(),
    *,
    split: str = "test",
    progress: bool = False,
) -> dict[str, Predictor]:
    """Load checkpoints and build baselines (``uniform``, ``retrieval``) as named table rows, in order."""
    from geoloc.checkpoint import read_config
    from geoloc.geolocator import Geolocator
    from geoloc.pipeline.store import FeatureStore

    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)} "
                          "(a vmf / vmf-mix model is a checkpoint: pass it with --checkpoint)")
    if not checkpoints and not baselines:
        raise ConfigError("nothing to evaluate: pass --checkpoint DIR and/or --baseline uniform|retrieval")
    if not stores:
        raise ConfigError("no feature store given; pass --store PATH")
    names = _row_names(checkpoints, baselines)
    store0 = Path(stores[0])
    dim = FeatureStore.open(store0).dim
    rows: dict[str, Predictor] = {}
    for name, ckpt in zip(names, checkpoints, strict=False):
        cfg = read_config(ckpt)
        bb = cfg.get("backbone") or {}
        # Check before loading weights: the config alone says which embeddings the model was trained on.
        check_backbone((bb.get("name") or None, int(bb.get("dim") or cfg.get("cond_dim") or 0) or None),
                       f"checkpoint {ckpt}", store0)
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        geo = Geolocator.from_pretrained(ckpt, device=device)
        rows[name] = GeolocatorPredictor(geo, config, source=str(ckpt))
    for name, base in zip(names[len(checkpoints):], baselines, strict=True):
        if base == "uniform":
            rows[name] = GeolocatorPredictor(uniform_geolocator(dim), config, kind="uniform", source="uniform on S²")
        else:
            if config.retrieval_split == split:
                raise ConfigError(f"retrieval over split {split!r} would find every item itself; set another "
                                  "--retrieval-split (the training split)")
            rows[name] = RetrievalPredictor.from_stores(stores, config.retrieval_split,
                                                        index=config.retrieval_index, progress=progress)
    return rows


def run_eval(
    stores: Sequence[str | Path],
    split: str = "test",
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
    """``geoloc eval`` as one call: build the rows, evaluate them in one pass, write the outputs to ``out_dir``."""
    rows = build_rows(stores, checkpoints, baselines, config, split=split, progress=progress)
    report = evaluate(rows, stores, split, config, progress=progress)
    if out_dir is not None:
        written = report.write(out_dir, csv=csv, plots=plots)
        if log:
            for kind, path in written.items():
                log(f"wrote {kind:<15} {path}")
    return report
