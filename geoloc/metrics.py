"""The published geolocation metrics as pure numpy functions (float64), with the reference's quirks on demand.

Formulas (docs/eval-protocol.md §2–§3, docs/reference-behaviour.md §9–§10): haversine distance with R = 6371
km, its mean (the published "dist") and median, GeoScore = mean 5000·exp(−d/1492.7), accuracy within 1 / 25 /
200 / 750 / 2500 km with a strict ``<``, admin accuracy at country / region / sub-region / city (labels from
:mod:`geoloc.gazetteer`), NLL in bits per dimension, localizability, and precision / recall / density /
coverage (Naeem et al. 2020) with k = 3 on the great-circle distance, over 20 chunks as the reference does.

``compat`` picks how failures and missing labels count:

- ``"fixed"`` (default): every item counts. A failed (NaN/inf) prediction is a miss: distance πR ≈ 20015 km,
  GeoScore 0, no label match. Ground-truth keys are compared as label tuples, a missing field meaning the
  same on both sides, and Namibia (``cc`` "NA") is a country like any other.
- ``"plonk"``: the published numbers' behaviour. Failed predictions are dropped from every average (quirk D).
  Ground-truth keys are read as pandas reads OSV-5M's CSV: a whole field in pandas' NA list becomes ``"NaN"``
  (so Namibia's ``NA`` never matches, quirk C), a missing admin field never equals the prediction's empty one
  (quirk A), and the reference's ``!= "nan"`` mask is applied, which after that never masks anything
  (quirk B).
  # reference differs: with admin levels, a batch holding a NaN prediction makes the reference's ``reverse()``
  # index a shorter array with a longer mask and raise IndexError; there is no published behaviour to copy,
  # so compat mode drops those items from the admin accuracies too, aligned with the distances.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
from scipy.spatial import cKDTree

from geoloc.config import COMPAT_MODES, Compat
from geoloc.errors import InputError
from geoloc.gazetteer import LEVELS, Gazetteer
from geoloc.sphere import EARTH_RADIUS_KM, haversine_km, latlon_to_xyz

__all__ = [
    "COMPAT_MODES",
    "GEOSCORE_MAX",
    "GEOSCORE_SCALE_KM",
    "MISS_KM",
    "PANDAS_NA_STRINGS",
    "THRESHOLDS_KM",
    "AdminMetrics",
    "Compat",
    "DistanceMetrics",
    "Nll",
    "Prdc",
    "Scores",
    "admin_metrics",
    "distance_metrics",
    "distances_km",
    "failed_predictions",
    "geoscore",
    "gt_label_ids",
    "localizability_bits",
    "localizability_stats",
    "nll_bits_per_dim",
    "prdc",
    "score",
]

THRESHOLDS_KM: tuple[float, ...] = (1.0, 25.0, 200.0, 750.0, 2500.0)
GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7
MISS_KM = math.pi * EARTH_RADIUS_KM
"""Distance charged to a failed prediction in ``"fixed"`` mode: half the great circle (the worst possible)."""

PANDAS_NA_STRINGS = frozenset(
    [
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    ]
)
"""Field values that ``pandas.read_csv`` turns into NaN by default (pandas 2.x ``STR_NA_VALUES``)."""


def _check_compat(compat: str) -> None:
    if compat not in COMPAT_MODES:
        raise InputError(f"unknown compat mode {compat!r}; choose from {', '.join(COMPAT_MODES)}")


def _as_latlon(x, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"{what}: expected an (N, 2) array of (lat, lon) degrees, got shape {arr.shape}")
    return arr


# ------------------------------------------------------------------------------------------------------------
# Distances
# ------------------------------------------------------------------------------------------------------------


def failed_predictions(pred_latlon) -> np.ndarray:
    """``(N,)`` bool: predictions with a NaN or infinite coordinate (e.g. asin(|z| > 1) in the reference)."""
    return ~np.isfinite(_as_latlon(pred_latlon, "predictions")).all(axis=1)


def distances_km(pred_latlon, gt_latlon) -> np.ndarray:
    """Haversine distance (km, R = 6371) per item; NaN where the prediction failed.

    Raises:
        InputError: shapes differ, or a ground-truth coordinate is not finite (ground truth must be valid).
    """
    pred = _as_latlon(pred_latlon, "predictions")
    gt = _as_latlon(gt_latlon, "ground truth")
    if pred.shape != gt.shape:
        raise InputError(f"predictions {pred.shape} and ground truth {gt.shape} differ in length")
    bad_gt = ~np.isfinite(gt).all(axis=1)
    if bad_gt.any():
        rows = np.flatnonzero(bad_gt)[:10].tolist()
        raise InputError(
            f"ground truth: {int(bad_gt.sum())} non-finite row(s) at index {rows}; drop them first"
        )
    d = haversine_km(pred, gt)
    d[failed_predictions(pred)] = np.nan
    return d


def geoscore(dist_km) -> np.ndarray:
    """GeoScore per item, 5000·exp(−d/1492.7) (the PIGEON / GeoGuessr constant); 0 for a NaN distance."""
    d = np.asarray(dist_km, dtype=np.float64)
    return np.where(np.isnan(d), 0.0, GEOSCORE_MAX * np.exp(-np.nan_to_num(d, nan=0.0) / GEOSCORE_SCALE_KM))


@dataclass(frozen=True)
class DistanceMetrics:
    """Distance-based summary. Fractions are in [0, 1]; ``accuracy_km[r]`` is the share with d < r km.

    ``n`` is the denominator used (all items in ``"fixed"`` mode, the non-failed ones in ``"plonk"``).
    """

    n: int
    n_failed: int
    mean_km: float
    median_km: float
    geoscore: float
    accuracy_km: dict[float, float]


def distance_metrics(
    dist_km, compat: Compat = "fixed", thresholds_km: Sequence[float] = THRESHOLDS_KM
) -> DistanceMetrics:
    """Mean / median distance, GeoScore and threshold accuracies from per-item distances (NaN = failed)."""
    _check_compat(compat)
    d = np.asarray(dist_km, dtype=np.float64)
    failed = np.isnan(d)
    gs = geoscore(d)
    if compat == "plonk":
        d, gs = d[~failed], gs[~failed]
    else:
        d = np.where(failed, MISS_KM, d)
    n = len(d)
    if n == 0:
        nan = float("nan")
        return DistanceMetrics(0, int(failed.sum()), nan, nan, nan, {float(r): nan for r in thresholds_km})
    return DistanceMetrics(
        n=n,
        n_failed=int(failed.sum()),
        mean_km=float(d.mean()),
        median_km=float(np.median(d)),
        geoscore=float(gs.mean()),
        accuracy_km={float(r): float((d < r).mean()) for r in thresholds_km},
    )


# ------------------------------------------------------------------------------------------------------------
# Administrative labels
# ------------------------------------------------------------------------------------------------------------

_N_FIELDS = {"country": 1, "region": 2, "sub-region": 3, "city": 4}


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fields_fixed(v) -> list[str] | None:
    """A GT key split into fields, OSV's literal ``"NaN"`` field read as the empty field it stands for."""
    if _is_missing(v) or str(v) in ("", "NaN", "nan"):
        return None
    return ["" if f == "NaN" else f for f in str(v).split("_")]


def _fixed_keys(gt_keys: Mapping[str, Sequence], n: int) -> dict[str, list[str | None]]:
    """Repair GT keys for tuple comparison; a missing key is rebuilt from a finer (or, for the sub-region,
    the region) key where the published data allow it: OSV drops ``unique_sub-region`` exactly when admin2
    is empty, and pandas turns Namibia's ``NA`` into NaN while ``…_NA`` region keys survive."""
    fields = {lv: [_fields_fixed(v) for v in gt_keys[lv]] for lv in gt_keys}
    out: dict[str, list[str | None]] = {}
    order = [lv for lv in ("city", "sub-region", "region", "country") if lv in fields]
    for lv in gt_keys:
        want = _N_FIELDS[lv]
        col: list[str | None] = []
        for i in range(n):
            f = fields[lv][i]
            if f is None:
                for finer in order:
                    g = fields[finer][i]
                    if _N_FIELDS[finer] > want and g is not None and len(g) == _N_FIELDS[finer]:
                        f = g[len(g) - want :]
                        break
            if f is None and lv == "sub-region" and "region" in fields and fields["region"][i] is not None:
                f = ["", *fields["region"][i]]
            col.append(None if f is None else "_".join(f))
        out[lv] = col
    return out


def gt_label_ids(
    gazetteer: Gazetteer,
    levels: Sequence[str],
    *,
    gt_keys: Mapping[str, Sequence] | None = None,
    gt_latlon=None,
    compat: Compat = "fixed",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Ground-truth label ids per level (into ``gazetteer.keys[level]``; -1 = can never match) and, per
    level, the reference's "counted" mask.

    Give either ``gt_keys`` (the dataset's published keys per level, e.g. OSV-5M's ``unique_country`` column
    for "country"; NaN/None allowed) or ``gt_latlon`` (labels then come from the same nearest-place rule;
    in ``"plonk"`` mode a key with an empty field, or a key pandas reads as NaN, can never match, as in
    OSV-5M's CSV).
    """
    _check_compat(compat)
    for lv in levels:
        if lv not in LEVELS:
            raise InputError(f"unknown label level {lv!r}; choose from {', '.join(LEVELS)}")
    if (gt_keys is None) == (gt_latlon is None):
        raise InputError("give exactly one of gt_keys (label columns) or gt_latlon (ground-truth points)")
    ids: dict[str, np.ndarray] = {}
    counted: dict[str, np.ndarray] = {}
    if gt_latlon is not None:
        gt = _as_latlon(gt_latlon, "ground truth")
        found = gazetteer.resolve(gt, ("place",)).ids["place"]
        for lv in levels:
            col = np.where(found >= 0, gazetteer.ids[lv][np.clip(found, 0, None)], -1).astype(np.int32)
            if compat == "plonk":
                # OSV-5M's CSV, read by pandas, never holds a prediction key with an empty field (quirk A) or
                # a key that is itself an NA token (Namibia's "NA", quirk C).
                na_key = np.fromiter((k in PANDAS_NA_STRINGS for k in gazetteer.keys[lv].tolist()), bool)
                place = np.clip(found, 0, None)
                col[gazetteer.places.has_empty_field(lv)[place] | na_key[np.clip(col, 0, None)]] = -1
            ids[lv] = col
            counted[lv] = np.ones(len(gt), dtype=bool)
        return ids, counted
    missing = [lv for lv in levels if lv not in gt_keys]
    if missing:
        raise InputError(f"ground-truth labels lack level(s) {missing}; have {sorted(gt_keys)}")
    lengths = {len(gt_keys[lv]) for lv in gt_keys}
    if len(lengths) != 1:
        raise InputError(f"ground-truth label columns differ in length: {sorted(lengths)}")
    n = lengths.pop()
    cols = {lv: list(gt_keys[lv]) for lv in gt_keys if lv in _N_FIELDS}
    for lv in levels:
        index = gazetteer.key_index[lv]
        if compat == "plonk":
            # pandas reads a whole field in its NA list as NaN and the loaders fill "NaN": never a prediction
            # key.
            ids[lv] = np.fromiter(
                (
                    index.get(v, -1) if isinstance(v, str) and v not in PANDAS_NA_STRINGS else -1
                    for v in cols[lv]
                ),
                np.int32,
                count=n,
            )
        else:
            ids[lv] = np.fromiter(
                (index.get(v, -1) if isinstance(v, str) else -1 for v in cols[lv]), np.int32, count=n
            )
        # Quirk B: the reference drops GT equal to "nan", but every NA token is "NaN" by then: nothing is
        # dropped.
        counted[lv] = np.ones(n, dtype=bool)
    if compat == "fixed":
        # Keys that are not prediction keys as they stand (missing, or OSV's "NaN" field): repair, then map.
        todo = np.flatnonzero(np.any([ids[lv] < 0 for lv in levels], axis=0)) if levels else np.empty(0, int)
        if todo.size:
            fixed = _fixed_keys({lv: [c[i] for i in todo] for lv, c in cols.items()}, len(todo))
            for lv in levels:
                index = gazetteer.key_index[lv]
                ids[lv][todo] = [index.get(v, -1) if v is not None else -1 for v in fixed[lv]]
    return ids, counted


@dataclass(frozen=True)
class AdminMetrics:
    """Admin-level accuracy. Per level: ``accuracy`` (fraction), ``hits`` (per item), ``n`` (denominator),
    ``n_unmatchable`` (items whose GT key can never match: missing, unknown, or a compat quirk)."""

    accuracy: dict[str, float]
    hits: dict[str, np.ndarray]
    n: dict[str, int]
    n_unmatchable: dict[str, int]
    pred_ids: dict[str, np.ndarray] = field(repr=False)
    gt_ids: dict[str, np.ndarray] = field(repr=False)


def admin_metrics(
    pred_latlon,
    gazetteer: Gazetteer,
    levels: Sequence[str],
    *,
    gt_keys: Mapping[str, Sequence] | None = None,
    gt_latlon=None,
    compat: Compat = "fixed",
) -> AdminMetrics:
    """Accuracy at each admin level: the predicted point's nearest-place key equals the ground truth's.

    A failed prediction never matches; in ``"plonk"`` mode it is also left out of the denominator.
    """
    pred = _as_latlon(pred_latlon, "predictions")
    gt_ids, counted = gt_label_ids(gazetteer, levels, gt_keys=gt_keys, gt_latlon=gt_latlon, compat=compat)
    pred_ids = gazetteer.label_ids(pred, levels) if levels else {}
    failed = failed_predictions(pred)
    acc, hits, n_used, n_bad = {}, {}, {}, {}
    for lv in levels:
        if len(gt_ids[lv]) != len(pred):
            raise InputError(f"{lv}: {len(gt_ids[lv])} ground-truth labels for {len(pred)} predictions")
        hit = (pred_ids[lv] == gt_ids[lv]) & (gt_ids[lv] >= 0)
        keep = counted[lv] & ~failed if compat == "plonk" else counted[lv]
        hits[lv] = hit
        n_used[lv] = int(keep.sum())
        n_bad[lv] = int(((gt_ids[lv] < 0) & keep).sum())
        acc[lv] = float(hit[keep].mean()) if n_used[lv] else float("nan")
    return AdminMetrics(acc, hits, n_used, n_bad, pred_ids, gt_ids)


# ------------------------------------------------------------------------------------------------------------
# Everything for one prediction set
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """Distance and admin metrics of one prediction set, plus per-item arrays for export.

    ``per_item``: ``dist_km`` (NaN = failed), ``geoscore``, ``failed`` and, per admin level, ``hit_<level>``.
    """

    compat: str
    distance: DistanceMetrics
    admin: AdminMetrics | None
    per_item: dict[str, np.ndarray] = field(repr=False)

    def as_dict(self) -> dict[str, float]:
        """Flat ``{name: value}``: ``n``, ``n_failed``, ``geoscore``, ``dist_km``, ``median_km``,
        ``acc_<r>km`` and ``acc_<level>`` (fractions)."""
        d = self.distance
        out: dict[str, float] = {
            "n": d.n,
            "n_failed": d.n_failed,
            "geoscore": d.geoscore,
            "dist_km": d.mean_km,
            "median_km": d.median_km,
        }
        out.update({f"acc_{r:g}km": v for r, v in d.accuracy_km.items()})
        if self.admin is not None:
            out.update({f"acc_{lv}": v for lv, v in self.admin.accuracy.items()})
        return out


def score(
    pred_latlon,
    gt_latlon,
    *,
    gazetteer: Gazetteer | None = None,
    levels: Sequence[str] = (),
    gt_keys: Mapping[str, Sequence] | None = None,
    compat: Compat = "fixed",
    thresholds_km: Sequence[float] = THRESHOLDS_KM,
) -> Scores:
    """All point metrics of predictions ``(N, 2)`` against ground truth ``(N, 2)`` (degrees).

    Admin levels need a ``gazetteer``; their ground truth is ``gt_keys`` when given (the dataset's published
    keys), else the ground-truth points labelled by the same rule.
    """
    _check_compat(compat)
    dist = distances_km(pred_latlon, gt_latlon)
    per_item = {"dist_km": dist, "geoscore": geoscore(dist), "failed": np.isnan(dist)}
    admin = None
    if levels:
        if gazetteer is None:
            raise InputError("admin-level accuracy needs a gazetteer (geoloc.gazetteer.Gazetteer.load())")
        admin = admin_metrics(
            pred_latlon,
            gazetteer,
            levels,
            gt_keys=gt_keys,
            gt_latlon=None if gt_keys is not None else gt_latlon,
            compat=compat,
        )
        per_item.update({f"hit_{lv}": admin.hits[lv] for lv in levels})
    return Scores(compat, distance_metrics(dist, compat, thresholds_km), admin, per_item)


# ------------------------------------------------------------------------------------------------------------
# Likelihood and localizability
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nll:
    """NLL in bits per ambient dimension over ``n`` items; ``n_failed`` NaN log-densities were left out."""

    bits_per_dim: float
    n: int
    n_failed: int


def nll_bits_per_dim(log_prob, dim: int = 3) -> Nll:
    """−mean(ln p)/(dim·ln 2) from natural-log densities (per steradian on S², per unit volume in R³).

    The uniform density on S², ln p = −ln 4π, gives log₂(4π)/3 ≈ 1.2172, the "Uniform 1.22" of Table 2.
    """
    lp = np.asarray(log_prob, dtype=np.float64).ravel()
    bad = np.isnan(lp)
    good = lp[~bad]
    value = float(-good.mean() / (dim * math.log(2.0))) if good.size else float("nan")
    return Nll(value, int(good.size), int(bad.sum()))


def localizability_bits(log_prob_samples, compat: Compat = "fixed") -> np.ndarray:
    """Localizability per item, E_{y∼p}[log₂ p(y|c)], from ``(N, S)`` natural-log densities of S samples.

    # reference differs: it divides by 4π·ln 2 instead of ln 2 (docs/reference-behaviour.md §9.3);
    # ``compat="plonk"`` reproduces that constant rescale.
    """
    _check_compat(compat)
    lp = np.asarray(log_prob_samples, dtype=np.float64)
    if lp.ndim != 2:
        raise InputError(f"expected (N, samples) log densities, got shape {lp.shape}")
    scale = 4.0 * math.pi * math.log(2.0) if compat == "plonk" else math.log(2.0)
    return lp.mean(axis=1) / scale


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's rho."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    bounds = np.flatnonzero(np.diff(xs) != 0) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(x)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e - 1) / 2.0
    return ranks


def localizability_stats(loc_bits, dist_km=None, bins: int = 10) -> dict[str, object]:
    """Summary of per-item localizability: mean, std, quantiles; with distances, Spearman's rho between
    localizability and error and the mean / median error per localizability quantile bin (the data of the
    "localizability against error" plot: more localizable images should have smaller errors)."""
    loc = np.asarray(loc_bits, dtype=np.float64).ravel()
    ok = np.isfinite(loc)
    out: dict[str, object] = {"n": int(ok.sum()), "n_failed": int((~ok).sum())}
    if not ok.any():
        return out
    v = loc[ok]
    out.update(
        mean=float(v.mean()),
        std=float(v.std()),
        quantiles={q: float(np.quantile(v, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
    )
    if dist_km is not None:
        d = np.asarray(dist_km, dtype=np.float64).ravel()
        if d.shape != loc.shape:
            raise InputError(f"{len(loc)} localizability values for {len(d)} distances")
        both = ok & np.isfinite(d)
        lv, dv = loc[both], d[both]
        if lv.size >= 2:
            rl, rd = _ranks(lv), _ranks(dv)
            rho = np.corrcoef(rl, rd)[0, 1] if rl.std() > 0 and rd.std() > 0 else float("nan")
            out["spearman_vs_dist"] = float(rho)
            edges = np.quantile(lv, np.linspace(0.0, 1.0, bins + 1))
            which = np.clip(np.searchsorted(edges, lv, side="right") - 1, 0, bins - 1)
            out["by_bin"] = [
                {
                    "loc_lo": float(edges[b]),
                    "loc_hi": float(edges[b + 1]),
                    "n": int((which == b).sum()),
                    "mean_km": float(dv[which == b].mean()) if (which == b).any() else float("nan"),
                    "median_km": float(np.median(dv[which == b])) if (which == b).any() else float("nan"),
                }
                for b in range(bins)
            ]
    return out


# ------------------------------------------------------------------------------------------------------------
# Precision / recall / density / coverage
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prdc:
    """Precision, recall, density and coverage (Naeem et al. 2020) of fake (predicted) vs real points."""

    precision: float
    recall: float
    density: float
    coverage: float

    def as_dict(self) -> dict[str, float]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "density": self.density,
            "coverage": self.coverage,
        }


def _ball_hits(tree_points, centres: np.ndarray, radii: np.ndarray, n_points: int) -> np.ndarray:
    """For each point of ``tree_points``, how many balls (centre, radius) contain it strictly (d < r)."""
    # query_ball_point keeps d ≤ r; the next float below r makes it d < r. A zero radius holds nothing.
    r = np.nextafter(radii, -np.inf)
    live = r >= 0
    lists = tree_points.query_ball_point(centres[live], r[live])
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.int64)
    return np.bincount(flat, minlength=n_points)


def _prdc_once(real: np.ndarray, fake: np.ndarray, k: int) -> Prdc:
    """PRDC of one chunk, exactly, with float64 KD-trees on unit vectors.

    The chord length |x − y| = 2 sin(θ/2) is strictly increasing in the great-circle angle θ ∈ [0, π], so
    k-th neighbours and every ``d < r`` test are the same as on the haversine distance the reference uses
    (``sklearn`` ``pairwise_distances(metric="haversine")``), without its O(N²) matrix.
    """
    if len(real) <= k or len(fake) <= k:
        raise InputError(
            f"PRDC with k={k} needs more than {k} points per chunk "
            f"(got {len(real)} real, {len(fake)} fake); use fewer chunks"
        )
    # float64 unit vectors: PRDC's ``d < r`` tests need every bit.
    xr, xf = latlon_to_xyz(real, np.float64), latlon_to_xyz(fake, np.float64)
    tr, tf = cKDTree(xr), cKDTree(xf)
    # The (k+1)-th smallest distance of each row, self included (the reference's "k-th neighbour, not self").
    r_real = tr.query(xr, k=k + 1)[0][:, k]
    r_fake = tf.query(xf, k=k + 1)[0][:, k]
    in_real_balls = _ball_hits(tf, xr, r_real, len(xf))  # per fake: real balls containing it
    in_fake_balls = _ball_hits(tr, xf, r_fake, len(xr))  # per real: fake balls containing it
    nearest_fake = tf.query(xr, k=1)[0]
    return Prdc(
        precision=float((in_real_balls > 0).mean()),
        recall=float((in_fake_balls > 0).mean()),
        density=float(in_real_balls.mean() / k),
        coverage=float((nearest_fake < r_real).mean()),
    )


def prdc(real_latlon, fake_latlon, k: int = 3, chunks: int | None = 20) -> Prdc:
    """Precision / recall / density / coverage of predictions (fake) against ground truth (real), degrees.

    ``chunks=20`` reproduces the reference: both sets are cut like ``torch.chunk`` (ceil(N/20) rows per
    chunk, aligned), scored per chunk and averaged, so the values depend on N. ``chunks=None`` (or 1) scores
    the whole sets at once. Rows with a failed prediction must be dropped beforehand (as the reference does).
    """
    real = _as_latlon(real_latlon, "real points")
    fake = _as_latlon(fake_latlon, "fake points")
    if not (np.isfinite(real).all() and np.isfinite(fake).all()):
        raise InputError(
            "PRDC: non-finite coordinates; drop failed predictions (metrics.failed_predictions) first"
        )
    if k < 1:
        raise InputError(f"PRDC: k must be ≥ 1, got {k}")
    if not chunks or chunks == 1:
        return _prdc_once(real, fake, k)
    if len(real) != len(fake):
        raise InputError(f"chunked PRDC pairs real and fake rows: got {len(real)} real and {len(fake)} fake")
    size = -(-len(real) // chunks)  # torch.chunk: ceil(N / chunks) rows, the last chunk shorter
    parts = [_prdc_once(real[a : a + size], fake[a : a + size], k) for a in range(0, len(real), size)]
    return Prdc(
        *(
            float(np.mean([getattr(p, f) for p in parts]))
            for f in ("precision", "recall", "density", "coverage")
        )
    )
