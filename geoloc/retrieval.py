"""Retrieval baselines on arrays: the nearest training item, and a similarity-weighted neighbour set.

Why a module of its own: the weighted row is the bar any generative model has to clear. On the demo it
beats the flow's best estimator by 120 GeoScore with no model at all (issue 13), so it must be a real
row of every table, fitted as carefully as the model it is compared with. The neighbours themselves (faiss
over a store) live in ``geoloc.pipeline.neighbours``; this module only takes their arrays:

- ``xyz`` ``(B, k, 3)``: unit vectors of the k nearest training items, most similar first;
- ``sim`` ``(B, k)``: their cosine similarities to the query.

The weighted answer treats the k neighbours, weighted by ``softmax(sim / τ)``, as a distribution over the
truth and returns the candidate maximising the expected GeoScore under it (by default the neighbours
themselves, so the answer is always a real training location).

:func:`best_expected_answer` generalises that to the score a table reports: GeoScore plus agreement of
administrative labels (country, region, city). The Bayes answer for an accuracy is the mode of the label
distribution, not the point that is closest on average, so an answer that only maximises expected GeoScore
gives away country and region hits when the distribution straddles a border (issue 13). Labels come in as
integer arrays (from any labeller, e.g. the gazetteer's); −1 means "no label" and never agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from geoloc.errors import ConfigError, InputError
from geoloc.metrics import GEOSCORE_MAX, GEOSCORE_SCALE_KM
from geoloc.sphere import EARTH_RADIUS_KM, angle, project

__all__ = [
    "PairwiseScores",
    "best_expected_answer",
    "expected_label_agreement",
    "fit_weighted_retrieval",
    "nearest_neighbour",
    "neighbour_log_weights",
    "pairwise_scores",
    "weighted_expected_geoscore",
    "weighted_geoscore_answer",
    "weighted_retrieval",
]

_CHUNK = 1 << 22  # pairwise entries (B × m × k) per chunk


def _check_neighbours(xyz: Tensor, sim: Tensor | None = None) -> None:
    if xyz.dim() != 3 or xyz.shape[-1] != 3 or xyz.shape[1] < 1:
        raise InputError(f"neighbour xyz: expected (B, k ≥ 1, 3) unit vectors, got {tuple(xyz.shape)}")
    if sim is not None and sim.shape != xyz.shape[:2]:
        raise InputError(f"neighbour sim: expected shape {tuple(xyz.shape[:2])}, got {tuple(sim.shape)}")


def neighbour_log_weights(sim: Tensor, tau: float, k: int | None = None) -> Tensor:
    """``log softmax(sim / τ)`` over the first ``k`` neighbours ``(B, k)``; missing neighbours (sim = −inf,
    faiss's answer when it finds fewer than k) get weight 0. A row with no neighbour at all is an error."""
    if not tau > 0:
        raise ConfigError(f"neighbour temperature tau must be > 0, got {tau}")
    s = sim if k is None else sim[:, :k]
    logits = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32) / tau
    if bool((~torch.isfinite(logits)).all(dim=1).any()):
        raise InputError("an item has no neighbour (all similarities missing); rebuild the index or raise k")
    return torch.log_softmax(logits, dim=1)


def nearest_neighbour(xyz: Tensor) -> Tensor:
    """The 1-NN answer ``(B, 3)``: the location of the most similar training item (the paper's row)."""
    _check_neighbours(xyz)
    return xyz[:, 0]


def weighted_expected_geoscore(candidates: Tensor, points: Tensor, log_w: Tensor) -> Tensor:
    """Σ_j w_j · 5000·exp(−d_km(c, p_j)/1492.7) for each candidate ``(B, m, 3)`` against weighted points
    ``(B, k, 3)`` with log-weights ``(B, k)`` (normalised over k): ``(B, m)``.

    Angles come from chords of differences (not 1 − c·p), so km-scale distances keep their precision.
    """
    if candidates.shape[0] != points.shape[0] or log_w.shape != points.shape[:2]:
        raise InputError(
            f"shapes do not match: candidates {tuple(candidates.shape)}, points "
            f"{tuple(points.shape)}, log_w {tuple(log_w.shape)}"
        )
    w = log_w.exp().to(points.dtype)
    b, m, _ = candidates.shape
    out = torch.empty((b, m), dtype=points.dtype, device=points.device)
    step = max(1, _CHUNK // max(1, b * points.shape[1]))
    with torch.no_grad():
        for lo in range(0, m, step):
            k = geoscore_kernel(candidates[:, lo : lo + step], points)
            out[:, lo : lo + step] = GEOSCORE_MAX * (k * w.unsqueeze(1)).sum(-1)
    return out


def geoscore_kernel(a: Tensor, b: Tensor, scale_km: float = GEOSCORE_SCALE_KM) -> Tensor:
    """exp(−d_km / ``scale_km``) between unit vectors ``a (B, m, 3)`` and ``b (B, k, 3)``: ``(B, m, k)``; at
    the default 1492.7 km it is GeoScore / 5000 of answering a when the truth is b. Angles come from chords of
    differences (not 1 − a·b), so km-scale distances keep their precision."""
    chord = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    theta = 2.0 * torch.asin((0.5 * chord).clamp(0.0, 1.0))
    return torch.exp(-(EARTH_RADIUS_KM / scale_km) * theta)


def weighted_geoscore_answer(points: Tensor, log_w: Tensor, candidates: Tensor | None = None) -> Tensor:
    """The candidate ``(B, 3)`` with the highest expected GeoScore under the weighted points (default
    candidates: the points themselves). Points with weight 0 (log_w = −inf) are never chosen when a
    weighted one exists, because they are excluded from the candidates."""
    cand = points if candidates is None else candidates
    score = weighted_expected_geoscore(cand, points, log_w)
    if candidates is None:
        score = torch.where(torch.isfinite(log_w), score, torch.full_like(score, -1.0))
    best = score.argmax(dim=1)
    return cand[torch.arange(cand.shape[0], device=cand.device), best]


def expected_label_agreement(cand_labels: Tensor, point_labels: Tensor, log_w: Tensor) -> Tensor:
    """Σ_j w_j · 1[label(c) = label(p_j)] for candidate labels ``(B, m)`` against weighted points' labels
    ``(B, k)`` with log-weights ``(B, k)``: ``(B, m)``, the probability that a candidate's label is the
    truth's under the weighted points. Label −1 (unlabelled) never agrees."""
    if cand_labels.shape[0] != point_labels.shape[0] or point_labels.shape != log_w.shape:
        raise InputError(
            f"shapes do not match: candidate labels {tuple(cand_labels.shape)}, point labels "
            f"{tuple(point_labels.shape)}, log_w {tuple(log_w.shape)}"
        )
    same = same_label(cand_labels, point_labels)
    return (same.to(log_w.dtype) * log_w.exp().unsqueeze(1)).sum(-1)


def same_label(a: Tensor, b: Tensor) -> Tensor:
    """``(B, m, k)``: whether label ``a[:, i]`` equals ``b[:, j]``; a −1 (unlabelled) in ``b`` agrees with
    nothing."""
    return (a.unsqueeze(2) == b.unsqueeze(1)) & (b.unsqueeze(1) >= 0)


@dataclass(frozen=True)
class PairwiseScores:
    """What :func:`best_expected_answer` computes that does not depend on the weights, for points
    ``(B, m, 3)``: ``geoscore[b, i, j]`` = GeoScore / 5000 of point i as the answer when point j is the truth,
    ``labels[b, i, j]`` = at how many label levels i and j agree. Fitting the answer scores dozens of
    weightings of the same candidates; with these, each costs two batched mat-vecs instead of a distance
    matrix and a label comparison."""

    geoscore: Tensor
    labels: Tensor | None = None

    def tail(self, start: int) -> PairwiseScores:
        """The scores among points ``start:`` only (e.g. without the flow's draws)."""
        lab = None if self.labels is None else self.labels[:, start:, start:]
        return PairwiseScores(self.geoscore[:, start:, start:], lab)


def pairwise_scores(points: Tensor, labels: dict[str, Tensor] | None = None) -> PairwiseScores:
    """:class:`PairwiseScores` of ``points (B, m, 3)`` with their ``labels[level] (B, m)`` (−1: unlabelled,
    agrees with nothing)."""
    kernel = geoscore_kernel(points, points)
    agree = None
    if labels:
        agree = torch.zeros_like(kernel)
        for lab in labels.values():
            lab = lab.to(points.device)
            agree += same_label(lab, lab).to(points.dtype)
    return PairwiseScores(kernel, agree)


def best_expected_answer(
    points: Tensor,
    log_w: Tensor,
    labels: dict[str, Tensor] | None = None,
    label_weight: float = 0.0,
    pairwise: PairwiseScores | None = None,
) -> Tensor:
    """The point of ``points (B, m, 3)`` (weighted by ``log_w (B, m)``) maximising the expected
    GeoScore / 5000 + ``label_weight`` · Σ_levels P(label agrees), with ``labels[level] (B, m)`` the points'
    labels. ``label_weight = 0`` (or no labels) is :func:`weighted_geoscore_answer`. Candidates are the
    points with non-zero weight. ``pairwise`` (:func:`pairwise_scores` of these points, labels included when
    ``label_weight > 0``) gives the same answer without recomputing distances and labels."""
    if label_weight < 0:
        raise ConfigError(f"label_weight must be >= 0, got {label_weight}")
    if pairwise is not None:
        w = log_w.exp().to(pairwise.geoscore.dtype).unsqueeze(-1)
        score = torch.bmm(pairwise.geoscore, w)[..., 0]
        if label_weight > 0:
            if pairwise.labels is None:
                raise ConfigError("best_expected_answer: label_weight > 0 needs pairwise label agreement")
            score = score + label_weight * torch.bmm(pairwise.labels, w)[..., 0]
        score = torch.where(torch.isfinite(log_w), score, torch.full_like(score, -1.0))
        return points[torch.arange(points.shape[0], device=points.device), score.argmax(dim=1)]
    if not labels or label_weight == 0:
        return weighted_geoscore_answer(points, log_w)
    score = weighted_expected_geoscore(points, points, log_w) / GEOSCORE_MAX
    for lab in labels.values():
        lab = lab.to(points.device)
        score = score + label_weight * expected_label_agreement(lab, lab, log_w.to(points.dtype))
    score = torch.where(torch.isfinite(log_w), score, torch.full_like(score, -1.0))
    return points[torch.arange(points.shape[0], device=points.device), score.argmax(dim=1)]


def weighted_retrieval(xyz: Tensor, sim: Tensor, tau: float, k: int | None = None) -> Tensor:
    """The weighted-neighbour answer ``(B, 3)``: the neighbour maximising expected GeoScore under the first
    ``k`` neighbours weighted by ``softmax(sim / τ)``. ``k = 1`` (or τ → 0) is the 1-NN answer."""
    _check_neighbours(xyz, sim)
    if k is not None and k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    pts = project(xyz if k is None else xyz[:, :k])
    return weighted_geoscore_answer(pts, neighbour_log_weights(sim, tau, k))


def fit_weighted_retrieval(
    xyz: Tensor,
    sim: Tensor,
    truth: Tensor,
    ks: tuple[int, ...] = (1, 4, 8, 16, 32, 64),
    taus: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2),
) -> dict:
    """Choose ``k`` and ``τ`` of :func:`weighted_retrieval` by the mean GeoScore of its answers against the
    validation truths ``(V, 3)``. Returns ``{"k", "tau", "geoscore", "grid": [{k, tau, geoscore}, ...]}``."""
    _check_neighbours(xyz, sim)
    rate = EARTH_RADIUS_KM / GEOSCORE_SCALE_KM
    grid = []
    for k in ks:
        if k > xyz.shape[1]:
            continue
        for tau in taus if k > 1 else taus[:1]:
            ans = weighted_retrieval(xyz, sim, tau, k)
            theta = angle(ans.to(truth.dtype), truth)
            grid.append(
                {
                    "k": int(k),
                    "tau": float(tau),
                    "geoscore": float(GEOSCORE_MAX * torch.exp(-rate * theta).mean()),
                }
            )
    if not grid:
        raise InputError(f"fit_weighted_retrieval: no k in {ks} fits {xyz.shape[1]} neighbours")
    best = max(grid, key=lambda r: r["geoscore"])
    return {**best, "grid": grid}
