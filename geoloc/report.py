"""What ``geoloc eval`` found and writes: the result types (:class:`Report`, :class:`RowResult`, the per-item
arrays they hold) and their forms on disk — ``report.json``, Markdown tables laid out like the paper's,
per-item predictions (Parquet, optionally CSV) and two PNG plots.

The result types live here, with what formats them, so that :mod:`geoloc.evaluate` (which computes them)
imports this module and never the other way round. By the time a :class:`Report` exists its numbers are
final; this module is presentation. Tables follow the paper (docs/reference-behaviour.md §17):

- Table 1, OSV-5M layout: GeoScore, mean distance (km), country / region / city accuracy (%);
  YFCC4k layout: GeoScore, mean distance, accuracy within 25 / 200 / 750 / 2500 km (%).
- Table 2: NLL in bits per dimension (lower is better; uniform on S² = log₂(4π)/3 ≈ 1.22).
- An extra table with what the paper does not print: N, failures, median km, 1 km, sub-region, PRDC,
  localizability.

Several seeds print as ``mean ± std`` (sample standard deviation over seeds).
Every file is written atomically (temporary name in the same folder, fsync, rename).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from geoloc import __version__
from geoloc.config import EvalConfig
from geoloc.files import atomic_write, atomic_write_text
from geoloc.metrics import MISS_KM, THRESHOLDS_KM, Nll, Scores

__all__ = [
    "EvalData",
    "Report",
    "RowPredictions",
    "RowResult",
    "format_tables",
    "plot_error_cdf",
    "plot_localizability",
    "prediction_tables",
    "write_outputs",
    "write_predictions",
]


# ------------------------------------------------------------------------------------------------------------
# Result types
# ------------------------------------------------------------------------------------------------------------


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
        return EvalData(
            self.ids[:n],
            self.latlon[:n],
            self.levels,
            self.label_source,
            {k: v[:n] for k, v in self.gt_keys.items()},
        )


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
    hdr_level: np.ndarray | None = None  # per item: the model's mass denser than the truth (calibration)

    def head(self, n: int) -> RowPredictions:
        return replace(
            self,
            hdr_level=None if self.hdr_level is None else self.hdr_level[:n],
            latlon=[p[:n] for p in self.latlon],
            log_prob=None if self.log_prob is None else self.log_prob[:n],
            localizability=None if self.localizability is None else self.localizability[:n],
        )


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
    # {"coverage": {"0.5": …, "0.9": …, "0.95": …}, "calibration_error": …, "n": …}; None: not measured
    calibration: dict[str, Any] | None = None

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
            "nll": None
            if self.nll is None
            else {
                "bits_per_dim": self.nll.bits_per_dim,
                "n": self.nll.n,
                "n_failed": self.nll.n_failed,
                "space": self.nll_space,
            },
            "localizability": self.localizability,
            "calibration": self.calibration,
            "admin_unmatchable": self.n_unmatchable,
            "elapsed_s": self.elapsed_s,
        }


@dataclass
class Report:
    """Everything one ``geoloc eval`` run measured. ``to_json()`` is ``report.json``; :meth:`write` writes
    the tables, per-item files and plots."""

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
        return _clean(
            {
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
            }
        )

    def table_markdown(self, layout: str | None = None) -> str:
        return format_tables(self, layout or self.config.table)

    def write(self, out_dir: str | Path, *, csv: bool = False, plots: bool = True) -> dict[str, Path]:
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


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------

# (header, metric key, scale, decimals)
_OSV = [
    ("GeoScore", "geoscore", 1.0, 0),
    ("dist (km)", "dist_km", 1.0, 0),
    ("country", "acc_country", 100.0, 1),
    ("region", "acc_region", 100.0, 1),
    ("city", "acc_city", 100.0, 1),
]
_YFCC = [
    ("GeoScore", "geoscore", 1.0, 0),
    ("dist (km)", "dist_km", 1.0, 0),
    ("25 km", "acc_25km", 100.0, 1),
    ("200 km", "acc_200km", 100.0, 1),
    ("750 km", "acc_750km", 100.0, 1),
    ("2500 km", "acc_2500km", 100.0, 1),
]
_PRDC = ("precision", "recall", "density", "coverage")


def _fmt(mean: float, std: float, seeds: int, scale: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "—"
    text = f"{mean * scale:,.{digits}f}"
    if seeds > 1 and math.isfinite(std):
        text += f" ± {std * scale:,.{digits}f}"
    return text


def _cell(row: RowResult, key: str, scale: float, digits: int) -> str:
    mean, std = row.stat(key)
    return _fmt(mean, std, len(row.metrics.get(key, [])), scale, digits)


def _calibrated(report: Report) -> int:
    """How many items the calibration covered (the most over rows: every calibrated row samples the same)."""
    return max((r.calibration or {}).get("n", 0) for r in report.rows)


def _markdown(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _layout_columns(report: Report, layout: str) -> tuple[str, list[tuple[str, str, float, int]]]:
    levels = set(report.levels)
    if layout == "auto":
        layout = "osv5m" if levels else "yfcc4k"
    if layout == "osv5m":
        cols = [c for c in _OSV if not c[1].startswith("acc_") or c[1][4:] in levels]
        return "OSV-5M layout", cols
    if layout == "yfcc4k":
        return "YFCC4k layout", list(_YFCC)
    admin = [
        (lv, f"acc_{lv}", 100.0, 1) for lv in ("country", "region", "sub-region", "city") if lv in levels
    ]
    thresholds = [(f"{r:g} km", f"acc_{r:g}km", 100.0, 1) for r in THRESHOLDS_KM]
    return "all columns", [*_YFCC[:2], ("median (km)", "median_km", 1.0, 0), *admin, *thresholds]


def format_tables(report: Report, layout: str = "auto") -> str:
    """The Markdown of ``table.md``: Table 1 in the chosen layout, Table 2 (NLL), and the extras."""
    cfg = report.config
    name, cols = _layout_columns(report, layout)
    seeds = ",".join(str(s) for s in cfg.seeds)
    head = (
        f"Split `{report.split or '?'}`, N = {report.n:,}"
        + (f" (of {report.n_read:,} read)" if report.n != report.n_read else "")
        + f"; estimator `{cfg.estimator}`, ω = {cfg.effective_omega():g}, {cfg.steps} {cfg.method} steps;"
        f" seeds {seeds}; compat `{cfg.compat}`."
    )
    out = [head, "", f"**Table 1** ({name}; accuracies in %, mean ± std over seeds)", ""]
    out.append(
        _markdown(
            ["Model", *(c[0] for c in cols)],
            [[r.name, *(_cell(r, k, s, d) for _, k, s, d in cols)] for r in report.rows],
        )
    )
    nll_rows = []
    for r in report.rows:
        if r.nll is None:
            nll_rows.append([r.name, "—", ""])
        else:
            space = "S² (per steradian)" if r.nll_space == "sphere" else "R³ (per unit volume)"
            nll_rows.append([r.name, _fmt(r.nll.bits_per_dim, 0.0, 1, 1.0, 2), space])
    out += [
        "",
        "**Table 2** (NLL of the true location in bits/dim, ω = "
        f"{cfg.likelihood.omega:g}; lower is better; uniform = 1.22)",
        "",
    ]
    out.append(_markdown(["Model", "NLL", "density"], nll_rows))
    extra_cols = [("median (km)", "median_km", 1.0, 0), ("1 km", "acc_1km", 100.0, 1)]
    if "sub-region" in report.levels:
        extra_cols.append(("sub-region", "acc_sub-region", 100.0, 1))
    if cfg.prdc:
        extra_cols += [(f"{m[0].upper()}{cfg.prdc_chunks}", m, 1.0, 2) for m in _PRDC]
        extra_cols += [(f"{m[0].upper()}", f"{m}_unchunked", 1.0, 2) for m in _PRDC]
    body = []
    any_loc = False
    for r in report.rows:
        counted = r.metrics.get("n", [float("nan")])[0]
        failed = int(sum(r.metrics.get("n_failed", [])))
        cells = [r.name, f"{counted:,.0f}", f"{failed:,}", *(_cell(r, k, s, d) for _, k, s, d in extra_cols)]
        loc = r.localizability or {}
        any_loc |= bool(loc)
        cells.append(_fmt(float(loc.get("mean", float("nan"))), 0.0, 1, 1.0, 2) if loc else "—")
        cells.append(_fmt(float(loc.get("spearman_vs_dist", float("nan"))), 0.0, 1, 1.0, 2) if loc else "—")
        body.append(cells)
    headers = ["Model", "N", "failed", *(c[0] for c in extra_cols), "loc. (bits)", "ρ(loc, err)"]
    if not any_loc:
        headers, body = headers[:-2], [b[:-2] for b in body]
    prdc_note = (
        (
            f"; P/R/D/C{cfg.prdc_chunks}: precision/recall/density/coverage (k = {cfg.prdc_k}) averaged "
            f"over {cfg.prdc_chunks} chunks as the reference, P/R/D/C: unchunked"
        )
        if cfg.prdc
        else ""
    )
    fate = "dropped, as the reference does" if cfg.compat == "plonk" else "scored as misses"
    out += ["", f"**Extra** (N: items counted; failed: predictions over all seeds, {fate}{prdc_note})", ""]
    out.append(_markdown(headers, body))
    if any(r.calibration for r in report.rows):
        out += [
            "",
            f"**Calibration** (share of true locations inside the model's 50 / 90 / 95 % highest-density "
            f"region, from {cfg.calibration_n} exact samples per item"
            + (f" on {_calibrated(report):,} items sampled by id hash" if cfg.calibration_items else "")
            + "; calibrated = nominal; error: mean "
            "|coverage − α| over α = 0.05 … 0.95, lower is better)",
            "",
        ]
        cal_rows = []
        for r in report.rows:
            c = r.calibration
            if not c:
                cal_rows.append([r.name, "—", "—", "—", "—"])
                continue
            cov = c["coverage"]
            cal_rows.append(
                [
                    r.name,
                    *(f"{100 * cov[a]:.1f}" for a in ("0.5", "0.9", "0.95")),
                    f"{c['calibration_error']:.3f}",
                ]
            )
        out.append(_markdown(["Model", "50 %", "90 %", "95 %", "cal. error"], cal_rows))
    if report.notes:
        out += ["", *(f"- {n}" for n in report.notes)]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------------
# Per-item predictions
# ------------------------------------------------------------------------------------------------------------


def _label_array(ids: np.ndarray, keys: np.ndarray) -> pa.Array:
    """Label ids (-1 = none) as a dictionary-encoded string column: compact, and fast to write."""
    idx = pa.array(np.asarray(ids, dtype=np.int32), mask=np.asarray(ids) < 0)
    return pa.DictionaryArray.from_arrays(idx, pa.array(keys, pa.string()))


def _column_name(level: str) -> str:
    return level.replace("-", "_")


def prediction_tables(report: Report) -> Iterator[pa.Table]:
    """Yield one Arrow table of per-item rows per (model row, seed): id, true and predicted lat/lon,
    ``dist_km`` (null when failed), ``failed``, true/predicted admin keys, ``log_prob`` (nats) and
    ``localizability_bits`` and ``hdr_level`` (calibration) when computed."""
    data = report.data
    n = report.n
    ids = pa.array(data.ids[:n].tolist(), pa.string())
    true_cols: dict[str, pa.Array] = {}
    first_admin = next((r.scores[0].admin for r in report.rows if r.scores and r.scores[0].admin), None)
    for lv in report.levels:
        if report.label_source == "columns":
            true_cols[lv] = pa.array(data.gt_keys[lv][:n], pa.string(), from_pandas=True)
        elif first_admin is not None:
            true_cols[lv] = _label_array(first_admin.gt_ids[lv], report.label_keys[lv])
    for r in report.rows:
        preds = r.predictions
        for k, seed in enumerate(r.seeds):
            sc = r.scores[k]
            pred = preds.latlon[k]
            failed = sc.per_item["failed"]
            cols: dict[str, pa.Array] = {
                "model": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([r.name])),
                "seed": pa.array(np.full(n, seed, np.int64)),
                "id": ids,
                "true_lat": pa.array(data.latlon[:, 0]),
                "true_lon": pa.array(data.latlon[:, 1]),
                "pred_lat": pa.array(pred[:, 0], mask=failed),
                "pred_lon": pa.array(pred[:, 1], mask=failed),
                "dist_km": pa.array(sc.per_item["dist_km"], mask=failed),
                "failed": pa.array(failed),
            }
            for lv in report.levels:
                cols[f"true_{_column_name(lv)}"] = true_cols[lv]
                cols[f"pred_{_column_name(lv)}"] = _label_array(
                    np.where(failed, -1, sc.admin.pred_ids[lv]), report.label_keys[lv]
                )
            if preds.log_prob is not None:
                cols["log_prob"] = pa.array(preds.log_prob, mask=~np.isfinite(preds.log_prob))
            if preds.localizability is not None:
                cols["localizability_bits"] = pa.array(
                    preds.localizability, mask=~np.isfinite(preds.localizability)
                )
            if preds.hdr_level is not None:
                # Calibration may cover only some items (EvalConfig.calibration_items); the rest: null.
                hdr = np.full(n, np.nan)
                hdr[: min(n, len(preds.hdr_level))] = preds.hdr_level[:n]
                cols["hdr_level"] = pa.array(hdr, mask=~np.isfinite(hdr))
            yield pa.table(cols)


def _unify(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """Rows without NLL/localizability get null columns, so every row fits the file's one schema."""
    if schema is None:
        return table
    cols = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(len(table), f.type) for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def _schema(report: Report) -> pa.Schema:
    """One schema for the whole file: the first table's columns plus NLL / localizability when any row
    has them (rows without get nulls)."""
    first = next(prediction_tables(report))
    optional = ("localizability_bits", "log_prob", "hdr_level")
    fields = [f for f in first.schema if f.name not in optional]
    preds = [r.predictions for r in report.rows if r.predictions is not None]
    if any(p.log_prob is not None for p in preds):
        fields.append(pa.field("log_prob", pa.float64()))
    if any(p.localizability is not None for p in preds):
        fields.append(pa.field("localizability_bits", pa.float64()))
    if any(p.hdr_level is not None for p in preds):
        fields.append(pa.field("hdr_level", pa.float64()))
    return pa.schema(fields)


def write_predictions(report: Report, path: str | Path, fmt: str = "parquet") -> Path:
    """Write every row's per-item predictions to one Parquet (zstd) or CSV file, atomically."""
    path = Path(path)
    schema = _schema(report)

    def write(tmp: str) -> None:
        if fmt == "parquet":
            with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
                for t in prediction_tables(report):
                    w.write_table(_unify(t, schema))
            return
        plain = pa.schema(
            [pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema]
        )
        with pacsv.CSVWriter(tmp, plain) as w:
            for t in prediction_tables(report):
                w.write_table(_unify(t, schema).cast(plain))

    atomic_write(path, write)
    return path


# ------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------

_MIN_KM = 0.1  # left edge of the log axis; smaller errors (e.g. exact retrieval) are drawn there


def _pyplot():
    # matplotlib is heavy (~0.5 s) and only needed when plots are asked for: imported here, on first use.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return path


def plot_error_cdf(report: Report, path: str | Path) -> Path:
    """Share of items within d km against d (log axis), one curve per row (first seed); failures count as
    misses at πR; dashed lines at the published thresholds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in report.rows:
        d = np.asarray(r.scores[0].per_item["dist_km"], dtype=np.float64)
        d = np.sort(np.clip(np.where(np.isnan(d), MISS_KM, d), _MIN_KM, None))
        y = np.arange(1, len(d) + 1) / len(d)
        ax.step(d, y, where="post", label=f"{r.name} (mean {r.stat('dist_km')[0]:,.0f} km)")
    for t in THRESHOLDS_KM:
        ax.axvline(t, color="0.6", linestyle="--", linewidth=0.8)
        ax.text(
            t,
            1.01,
            f"{t:g} km",
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.35",
            transform=ax.get_xaxis_transform(),
        )
    ax.set_xscale("log")
    ax.set_xlim(_MIN_KM, MISS_KM * 1.05)
    ax.set_ylim(0, 1)
    ax.set_xlabel("geolocation error (km, log scale)")
    ax.set_ylabel("fraction of items with error ≤ d")
    ax.set_title(f"Error CDF, split {report.split or '?'} (N = {report.n:,})", pad=16)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_localizability(report: Report, path: str | Path, max_points: int = 20000) -> Path | None:
    """Error against localizability per row that has it: a scatter (up to ``max_points``) and the median
    error per localizability decile. More localizable images should have smaller errors."""
    rows = [r for r in report.rows if r.predictions is not None and r.predictions.localizability is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(5.0 * len(rows), 4.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, r in zip(axes[0], rows, strict=True):
        loc = r.predictions.localizability
        d = np.asarray(r.scores[0].per_item["dist_km"], dtype=np.float64)
        ok = np.isfinite(loc) & np.isfinite(d)
        idx = np.flatnonzero(ok)
        if len(idx) > max_points:
            idx = rng.choice(idx, max_points, replace=False)
        ax.scatter(loc[idx], np.clip(d[idx], _MIN_KM, None), s=4, alpha=0.3, color="tab:blue", linewidths=0)
        bins = (r.localizability or {}).get("by_bin") or []
        if bins:
            centres = [(b["loc_lo"] + b["loc_hi"]) / 2 for b in bins]
            med = [max(b["median_km"], _MIN_KM) if math.isfinite(b["median_km"]) else np.nan for b in bins]
            ax.plot(centres, med, "o-", color="tab:red", label="median per decile")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("localizability (bits, higher = more localizable)")
        ax.set_ylabel("error (km)")
        rho = (r.localizability or {}).get("spearman_vs_dist")
        ax.set_title(
            r.name + (f" (Spearman ρ = {rho:.2f})" if rho is not None and math.isfinite(rho) else "")
        )
        ax.grid(True, alpha=0.3)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# Everything
# ------------------------------------------------------------------------------------------------------------


def write_outputs(
    report: Report, out_dir: str | Path, *, csv: bool = False, plots: bool = True
) -> dict[str, Path]:
    """Write ``report.json``, ``table.md``, ``predictions.parquet`` (+ ``predictions.csv``) and the PNG plots
    into ``out_dir`` (created); returns what was written, by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    body = json.dumps(report.to_json(), indent=2, allow_nan=False)
    atomic_write_text(out / "report.json", body + "\n")
    written["report"] = out / "report.json"
    table = report.table_markdown()
    atomic_write_text(out / "table.md", table)
    written["table"] = out / "table.md"
    written["predictions"] = write_predictions(report, out / "predictions.parquet")
    if csv:
        written["csv"] = write_predictions(report, out / "predictions.csv", fmt="csv")
    if plots:
        written["error-cdf"] = plot_error_cdf(report, out / "error_cdf.png")
        loc = plot_localizability(report, out / "localizability.png")
        if loc is not None:
            written["localizability"] = loc
    return written
