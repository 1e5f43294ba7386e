"""``evaluate``: the paper's metrics for geolocators and baselines, in one pass over batches of embeddings.

Why a driver of its own: the published numbers depend on protocol details that are easy to get wrong
(docs/eval-protocol.md §7): every test item is scored (no dropped last batch), the point is one guided sample
(ω = 2, 250 Euler steps), a failed (NaN) prediction is a miss and is counted, admin labels come from the
reverse_geocoder nearest place, RFM numbers are mean ± std over seeds. This module does the streaming and the
bookkeeping; the rows are :mod:`geoloc.predictors`, the formulas :mod:`geoloc.metrics`, the labels
:mod:`geoloc.gazetteer`, and the result types with their tables, files and plots :mod:`geoloc.report`.

It never sees a store: :func:`evaluate` takes an iterable of batches (``ids``, ``cond``, ``latlon``,
``labels``; the pipeline's ``iter_eval_batches`` yields them, ``pipeline/eval_job.py`` wires the two). Each
batch goes to every *row* of the table, which predicts it once per seed (each seed has its own generator that
carries over from batch to batch), and once computes the exact log-density of the true location (NLL, ω = 0)
and, if asked, the localizability. After the pass :func:`score_rows` turns the per-item arrays into metrics;
it takes plain arrays, so precomputed predictions go through exactly the same code (``bench/bench_eval.py``).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from geoloc.calibration import DEFAULT_LEVELS, calibration_error, coverage, hdr_levels
from geoloc.config import LABEL_MODES, EvalConfig
from geoloc.devices import resolve_device
from geoloc.errors import BackboneError, ConfigError, InputError, StoreError
from geoloc.gazetteer import LEVELS, Gazetteer
from geoloc.geolocator import Geolocator
from geoloc.metrics import failed_predictions, localizability_stats, nll_bits_per_dim, prdc, score
from geoloc.predictors import GeolocatorPredictor, Predictor
from geoloc.progress import progress_bar
from geoloc.report import EvalData, Report, RowPredictions, RowResult
from geoloc.sphere import latlon_to_xyz
from geoloc.subsample import in_hash_sample

__all__ = [
    "Batch",
    "as_rows",
    "evaluate",
    "resolve_labels",
    "score_rows",
]


class Batch(Protocol):
    """One batch of the evaluated split: ``ids``, ``cond (B, D)`` float32, ``latlon (B, 2)`` float64 degrees,
    and ``labels`` (column name → ``(B,)`` object array, None = missing). The pipeline's ``EvalBatch`` is
    one."""

    ids: Sequence[str]
    cond: torch.Tensor
    latlon: np.ndarray
    labels: Mapping[str, np.ndarray]

    def __len__(self) -> int: ...


# ------------------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------------------


def resolve_labels(
    labels: str | Mapping[str, str], columns: Collection[str]
) -> tuple[dict[str, str | None], str | None]:
    """Admin levels to score and where their ground truth comes from: ``({level: column or None}, source)``.

    ``columns`` are the label columns the data has. ``source`` is ``"columns"``, ``"latlon"`` or None (no
    admin metrics). A mapping is checked against the published levels and against ``columns``.
    """
    columns = set(columns)
    if isinstance(labels, str):
        if labels == "none":
            return {}, None
        if labels == "latlon":
            return {lv: None for lv in LEVELS}, "latlon"
        if labels == "auto":
            found = {lv: f"unique_{lv}" for lv in LEVELS if f"unique_{lv}" in columns}
            return found, ("columns" if found else None)
        raise ConfigError(
            f"labels must be one of {', '.join(LABEL_MODES)} or LEVEL=COLUMN pairs, got {labels!r}"
        )
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


# ------------------------------------------------------------------------------------------------------------
# The pass
# ------------------------------------------------------------------------------------------------------------


class _RowState:
    """Accumulates one predictor's outputs over the batches of the pass."""

    def __init__(self, name: str, predictor: Predictor, config: EvalConfig, total: int | None = None) -> None:
        self.name, self.predictor, self.config = name, predictor, config
        self.seeds = list(config.seeds[:1] if predictor.deterministic else config.seeds)
        self.generators = [predictor.generator(s) for s in self.seeds]
        # Localizability has its own stream, so turning it on does not change the predictions.
        self.loc_generator = predictor.generator(config.seeds[0] + 7_919) if config.localizability else None
        self.preds: list[list[np.ndarray]] = [[] for _ in self.seeds]
        self.log_prob: list[np.ndarray] = []
        self.loc: list[np.ndarray] = []
        self.hdr: list[np.ndarray] = []
        # Calibration samples have their own stream too.
        self.cal_generator = predictor.generator(config.seeds[0] + 104_729) if config.calibration else None
        self.cal_rng = np.random.default_rng(config.seeds[0] + 104_729)  # the levels' randomised ranks
        self.has_lp = config.nll
        self.has_loc = config.localizability
        self.has_cal = config.calibration and hasattr(predictor, "sample_log_prob")
        # Calibration costs calibration_n likelihoods per item: optionally only about calibration_items of
        # them — a uniform sample by id hash when the pass's size is known (evaluate's ``total``; store order
        # is often sorted, so the first items would be a biased slice), else the first items of the pass.
        self.cal_left = config.calibration_items or None
        self.cal_fraction = (
            min(1.0, config.calibration_items / total) if config.calibration_items and total else None
        )
        # Rows of one model with different estimators share its density: the first computes the NLL and
        # calibration of each batch (``last_lp`` / ``last_hdr``), the others (``leader`` set) copy them.
        self.leader: _RowState | None = None
        self.last_lp: np.ndarray | None = None
        self.last_hdr: np.ndarray | None = None
        self.elapsed = 0.0

    def _calibrated_rows(self, ids: np.ndarray, n: int) -> np.ndarray:
        """Positions in this batch whose calibration is computed (see ``cal_fraction`` / ``cal_left``)."""
        if self.cal_fraction is not None:
            return np.flatnonzero(in_hash_sample(ids, self.cal_fraction))
        m = n if self.cal_left is None else min(self.cal_left, n)
        return np.arange(m)

    def consume(self, cond: torch.Tensor, xyz: torch.Tensor, ids: np.ndarray) -> None:
        t0 = time.perf_counter()
        for k, g in enumerate(self.generators):
            p = np.asarray(self.predictor.predict(cond, g), dtype=np.float64)
            if p.shape != (cond.shape[0], 2):
                raise InputError(
                    f"row {self.name!r}: predictor returned shape {p.shape} for {cond.shape[0]} items"
                )
            self.preds[k].append(p)
        if self.leader is not None:
            self._copy_density(self.leader)
            self.elapsed += time.perf_counter() - t0
            return
        lp = None
        self.last_lp = self.last_hdr = None
        if self.has_lp or self.has_cal:
            lp = self.predictor.log_prob(xyz, cond)
            self.last_lp = None if lp is None else np.asarray(lp, dtype=np.float64).reshape(-1)
            if lp is None:
                self.has_lp = self.has_cal = False
            elif self.has_lp:
                self.log_prob.append(np.asarray(lp, dtype=np.float64).reshape(-1))
        rows = self._calibrated_rows(ids, cond.shape[0]) if self.has_cal else np.arange(0)
        if self.has_cal and len(rows) > 0:
            pick = torch.from_numpy(rows).to(cond.device)
            slp = self.predictor.sample_log_prob(cond[pick], self.cal_generator)
            if slp is None:
                self.has_cal = False
            else:
                levels = hdr_levels(slp, np.asarray(lp, dtype=np.float64).reshape(-1)[rows], self.cal_rng)
                if hasattr(self.predictor, "calibrate_levels"):  # regions recalibrated on validation
                    levels = self.predictor.calibrate_levels(levels)
                if self.cal_left is not None:
                    self.cal_left -= len(rows)
        if self.has_cal:  # one level per item of the batch: NaN where not calibrated
            full = np.full(cond.shape[0], np.nan)
            if len(rows) > 0:
                full[rows] = levels
            self.hdr.append(full)
            self.last_hdr = full
        if self.has_loc:
            loc = self.predictor.localizability(cond, self.loc_generator)
            if loc is None:
                self.has_loc = False
            else:
                self.loc.append(np.asarray(loc, dtype=np.float64).reshape(-1))
        self.elapsed += time.perf_counter() - t0

    def _copy_density(self, leader: _RowState) -> None:
        """This batch's NLL and calibration from the row that shares this row's density."""
        self.has_lp, self.has_cal, self.has_loc = leader.has_lp, leader.has_cal, leader.has_loc
        if self.has_lp and leader.last_lp is not None:
            self.log_prob.append(leader.last_lp)
        if self.has_cal and leader.last_hdr is not None:
            self.hdr.append(leader.last_hdr)
        if self.has_loc and leader.loc:
            self.loc.append(leader.loc[-1])

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
            hdr_level=cat(self.hdr) if self.has_cal else None,
            elapsed_s=self.elapsed,
        )


def as_rows(models: Any, config: EvalConfig) -> dict[str, Predictor]:
    """Table rows from a Geolocator, a Predictor, or a mapping name → either (Geolocators get ``config``)."""
    if not isinstance(models, Mapping):
        models = {"model": models}
    if not models:
        raise ConfigError("nothing to evaluate: give at least one checkpoint or baseline")
    out: dict[str, Predictor] = {}
    for name, m in models.items():
        out[str(name)] = GeolocatorPredictor(m, config, source=str(name)) if isinstance(m, Geolocator) else m
    return out


def evaluate(
    models: Any,
    batches: Iterable[Batch],
    config: EvalConfig = EvalConfig(),
    *,
    levels: Mapping[str, str | None] | None = None,
    label_source: str | None = None,
    gazetteer: Gazetteer | None = None,
    progress: bool = False,
    total: int | None = None,
    desc: str = "eval",
) -> Report:
    """Evaluate one or more models on ``batches`` in one pass; one table row per model.

    Args:
        models: a :class:`~geoloc.geolocator.Geolocator`, a :class:`~geoloc.predictors.Predictor`, or a
            mapping row name → either (e.g. ``{"rfm": geo, "uniform": uniform_geolocator(dim)}``).
        batches: the evaluated items, every one once (see :class:`Batch`).
        levels, label_source: the admin levels to score, from :func:`resolve_labels` (none by default);
            with ``label_source="columns"`` each level's ground truth is that column of ``batch.labels``.
        gazetteer: a loaded :class:`~geoloc.gazetteer.Gazetteer` to reuse (else loaded when admin levels
            are scored).
        progress, total, desc: a progress bar on stderr that moves per batch (``total`` items, if known).
    Raises:
        BackboneError: a row expects embeddings of another dimension than the batches hold.
    """
    rows = as_rows(models, config)
    levels = dict(levels or {})
    label_cols = sorted({c for c in levels.values() if c})
    states = [_RowState(name, pred, config, total) for name, pred in rows.items()]
    leaders: dict[Any, _RowState] = {}
    for st in states:
        key = getattr(st.predictor, "density_key", None)
        if key is not None:
            leader = leaders.setdefault(key, st)
            st.leader = None if leader is st else leader
    _share_flow_truths(states)
    device = resolve_device(config.device)
    ids: list[np.ndarray] = []
    latlon: list[np.ndarray] = []
    labels: dict[str, list[np.ndarray]] = {c: [] for c in label_cols}
    t0 = time.perf_counter()
    with progress_bar(total, desc, enabled=progress, leave=False) as bar:
        for batch in batches:
            if not ids:
                _check_dims(rows, int(batch.cond.shape[-1]))
            ids.append(np.asarray(batch.ids, dtype=object))
            latlon.append(batch.latlon)
            for c in label_cols:
                labels[c].append(batch.labels[c])
            cond = batch.cond.to(device)
            xyz = latlon_to_xyz(torch.from_numpy(batch.latlon)).to(device=device, dtype=torch.float32)
            for st in states:
                bar.set_postfix_str(st.name, refresh=True)  # which row is working, while a batch is long
                st.consume(cond, xyz, np.asarray(batch.ids, dtype=object))
            bar.update(len(batch))
    data = EvalData(
        ids=np.concatenate(ids) if ids else np.empty(0, dtype=object),
        latlon=np.concatenate(latlon) if latlon else np.empty((0, 2)),
        levels=levels,
        label_source=label_source,
        gt_keys={lv: np.concatenate(labels[c]) for lv, c in levels.items() if c},
    )
    report = score_rows(data, [st.result() for st in states], config, gazetteer=gazetteer)
    report.elapsed_s = time.perf_counter() - t0
    return report


def _share_flow_truths(states: list[_RowState]) -> None:
    """A hybrid row whose flow is also a row of its own (same weights, same likelihood settings, scored
    before it on each batch) takes that row's log-density at the truths instead of solving it again."""
    flows: dict[Any, Any] = {}
    for st in states:
        if st.leader is not None or not (st.has_lp or st.has_cal):
            continue
        key = getattr(st.predictor, "flow_key", None)
        if key is None:
            continue
        if hasattr(st.predictor, "reuse_flow_of"):
            if key in flows:
                st.predictor.reuse_flow_of(flows[key])
        elif hasattr(st.predictor, "last_truths"):
            flows.setdefault(key, st.predictor)


def _check_dims(rows: Mapping[str, Predictor], dim: int) -> None:
    for name, pred in rows.items():
        want = pred.expects[1]
        if want is not None and int(want) != dim:
            raise BackboneError(
                f"model {name!r} expects {want}-d embeddings but the batches hold {dim}-d ones"
            )


# ------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------


def _load_gazetteer(cache_dir: str | None) -> Gazetteer:
    """The cached H3 table when there is one (fast); otherwise the exact KD-tree (same labels)."""
    try:
        return Gazetteer.load(cache_dir=cache_dir, build=False)
    except StoreError:
        return Gazetteer.load(table=False)


def _prdc_metrics(
    gt: np.ndarray, pred: np.ndarray, config: EvalConfig, notes: list[str], name: str
) -> dict[str, float]:
    """PRDC on the items with a prediction (the reference drops failures too), chunked and unchunked."""
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


def calibration_stats(levels: np.ndarray) -> dict[str, Any]:
    """Coverage of the 50 / 90 / 95 % highest-density regions and the calibration error (mean |coverage(α) −
    α| over α = 0.05 … 0.95) from each truth's HDR level; a calibrated model covers α of the truths."""
    levels = np.asarray(levels, dtype=np.float64)
    levels = levels[np.isfinite(levels)]  # items outside the calibration sample are NaN
    cov = coverage(levels, DEFAULT_LEVELS)
    return {
        "coverage": {f"{a:g}": v for a, v in cov.items()},
        "calibration_error": calibration_error(levels),
        "n": len(levels),
    }


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
        notes.append(
            f"drop_tail={config.drop_tail}: scored the first {keep:,} of {n_read:,} items "
            "(PLONK's single-device loader, quirk E)"
        )
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
            sc = score(
                pred, data.latlon, gazetteer=gazetteer, levels=levels, gt_keys=gt_keys, compat=config.compat
            )
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
        cal = None if row.hdr_level is None else calibration_stats(row.hdr_level)
        unmatchable = dict(scores[0].admin.n_unmatchable) if scores and scores[0].admin is not None else {}
        results.append(
            RowResult(
                row.name,
                row.info,
                list(row.seeds),
                metrics,
                nll,
                row.nll_space,
                loc,
                unmatchable,
                row.elapsed_s,
                scores,
                row,
                calibration=cal,
            )
        )
    label_keys = {lv: gazetteer.keys[lv] for lv in levels} if levels and gazetteer is not None else {}
    return Report(
        config=config,
        n=n,
        n_read=n_read,
        levels=dict(data.levels),
        label_source=data.label_source,
        rows=results,
        data=data,
        label_keys=label_keys,
        notes=notes,
    )
