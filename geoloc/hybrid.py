"""A hybrid density: the flow's p(x | c) mixed with von Mises–Fisher kernels on the condition's neighbours.

Why: on the demo the flow loses to plain nearest-neighbour retrieval on every column (issue 13): a small
network cannot memorise which of 137k names sits where, while the training set itself can. The hybrid keeps
the flow's calibrated, smooth distribution and adds the memory of the training set, as a proper density:

    p(x | c) = λ(c)·p_flow(x | c) + (1 − λ(c))·Σ_k w_k(c)·vMF(x; x_k, κ)

over the ``k`` nearest training items in feature space (cosine similarity ``s_k``), with
``w = softmax(s / τ)`` and a flow weight ``λ(c) = σ(a + b·s_1)`` that depends on how similar the best
neighbour is (``b = 0``: one constant λ). Both components are normalised on S², so the mixture is too, and
every verb stays exact: ``log_prob`` is a log-sum-exp of the two normalised log-densities; sampling picks the
component, then draws from the flow (the likelihood ODE run forward, :meth:`OdeFamily.sample_exact`) or a
vMF around a neighbour; ``localizability`` is Monte-Carlo over exact samples with exact log-densities.

The neighbours come in as tensors (:class:`Neighbours`) from any object with a ``search(cond, k)`` method
(:class:`NeighbourSearch`): :class:`ExactNeighbours` here (brute force, for tests and small sets) or the faiss
index of ``geoloc.pipeline.neighbours``. This module never opens a file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from geoloc.calibration import LevelMap
from geoloc.config import LikelihoodConfig
from geoloc.errors import ConfigError, InputError
from geoloc.estimators import ESTIMATORS, top_k_modes
from geoloc.families import OdeFamily, vmf_sample
from geoloc.geolocator import Geolocator, Prediction
from geoloc.metrics import GEOSCORE_MAX, GEOSCORE_SCALE_KM
from geoloc.retrieval import (
    PairwiseScores,
    best_expected_answer,
    geoscore_kernel,
    neighbour_log_weights,
    pairwise_scores,
)
from geoloc.sphere import EARTH_RADIUS_KM, angle, project, xyz_to_latlon

__all__ = [
    "ExactNeighbours",
    "HybridGeolocator",
    "HybridParams",
    "Labeller",
    "NeighbourSearch",
    "Neighbours",
    "fit_answer_flow",
    "fit_hybrid_params",
    "flow_log_weight",
    "mixture_log_prob",
    "neighbour_log_prob",
]

_LOG_2PI = math.log(2 * math.pi)

#: Maps points ``(N, 2)`` (lat, lon degrees) to integer label ids per level (−1: none), e.g.
#: ``functools.partial(Gazetteer.label_ids, levels=ANSWER_LEVELS)``.
Labeller = Callable[[np.ndarray], dict[str, np.ndarray]]

#: The administrative levels the label-aware answer agrees on: the accuracy columns of the paper's tables.
ANSWER_LEVELS: tuple[str, ...] = ("country", "region", "city")


# ------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class HybridParams:
    """The hybrid's knobs (all fitted on a validation split by exact likelihood, see
    :func:`fit_hybrid_params`).

    ``k`` neighbours, weight temperature ``tau`` on cosine similarities, vMF concentration ``kappa`` (per
    steradian: a kernel of angular scale ≈ 1/√κ rad, so κ = 4e4 is ≈ 32 km), and the flow weight
    λ = σ(``lam_a`` + ``lam_b``·s₁) with s₁ the top-1 similarity. ``kappa_slope`` β makes each kernel's
    concentration follow its neighbour's similarity, κ_k = κ·exp(β·(s_k − 1)): a near-identical feature
    (the same name) pins the place down more tightly than a loosely similar one (β = 0: one κ).
    ``answer_k`` / ``answer_tau`` (0: ``k`` / ``tau``) weight the neighbours in the GeoScore answer only: the
    density's weighting is the one that maximises likelihood, the answer's the one that maximises GeoScore on
    validation (fitted like the weighted-retrieval row). ``answer_flow`` s scales the flow's share in the
    answer only, λ'(c) = s·λ(c), chosen by mean GeoScore on validation (:func:`fit_answer_flow`): the density
    is the likelihood's, but an undertrained flow may deserve less say in the single best guess than in the
    density (s = 1: the density's λ; s = 0: the neighbours' answer, with the flow draws still candidates).
    ``answer_poe`` β lets the flow vote on the neighbours instead (a product of experts): each neighbour's
    weight is multiplied by (f_k + :data:`POE_FLOOR`)^β, with f_k the share of the flow's draws near it (a
    :data:`POE_KERNEL_KM` kernel, :func:`flow_support`), so neighbours where the flow puts no mass lose
    say while the candidates stay the neighbours (β = 0: off). ``answer_draws``: how many flow draws the
    answer makes (0: as many as the caller's ``n``); the fit records the count s and β were chosen with, so
    a prediction asking for 256 samples for its top-k still answers as fitted, at a 16th of the cost.
    ``answer_steps``: the sampler steps of those draws (0: the caller's ``steps``), recorded by the fit for
    the same reason: the settings were chosen on draws of that many steps.
    ``answer_labels`` α adds α · Σ_levels P(the answer's label is the truth's) at :data:`ANSWER_LEVELS` to the
    answer's expected GeoScore / 5000 (needs a :data:`Labeller`; 0: GeoScore only); chosen with s on
    validation.
    """

    k: int = 16
    tau: float = 0.05
    kappa: float = 4.0e4
    lam_a: float = 0.0
    lam_b: float = 0.0
    kappa_slope: float = 0.0
    answer_k: int = 0
    answer_tau: float = 0.0
    answer_flow: float = 1.0
    answer_labels: float = 0.0
    answer_poe: float = 0.0
    answer_draws: int = 0
    answer_steps: int = 0

    @property
    def search_k(self) -> int:
        """Neighbours every query needs: the density's k and the answer's."""
        return max(self.k, self.answer_k)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"hybrid k must be >= 1, got {self.k}")
        if not (self.tau > 0 and self.kappa > 0):
            raise ConfigError(f"hybrid tau and kappa must be > 0, got tau={self.tau}, kappa={self.kappa}")
        if not 0.0 <= self.answer_flow <= 1.0:
            raise ConfigError(f"hybrid answer_flow must be in [0, 1], got {self.answer_flow}")
        if not (math.isfinite(self.answer_labels) and self.answer_labels >= 0):
            raise ConfigError(f"hybrid answer_labels must be >= 0, got {self.answer_labels}")
        if not (math.isfinite(self.answer_poe) and self.answer_poe >= 0):
            raise ConfigError(f"hybrid answer_poe must be >= 0, got {self.answer_poe}")
        if self.answer_draws < 0 or self.answer_steps < 0:
            raise ConfigError(
                f"hybrid answer_draws and answer_steps must be >= 0, got {self.answer_draws}, "
                f"{self.answer_steps}"
            )
        if not all(math.isfinite(v) for v in (self.lam_a, self.lam_b, self.kappa_slope)):
            raise ConfigError(f"hybrid lam_a, lam_b, kappa_slope must be finite, got {self}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HybridParams:
        return cls(
            **{
                k: d[k]
                for k in (
                    "k",
                    "tau",
                    "kappa",
                    "lam_a",
                    "lam_b",
                    "kappa_slope",
                    "answer_k",
                    "answer_tau",
                    "answer_flow",
                    "answer_labels",
                    "answer_poe",
                    "answer_draws",
                    "answer_steps",
                )
                if k in d
            }
        )


# ------------------------------------------------------------------------------------------- neighbours


@dataclass
class Neighbours:
    """The k nearest training items of B queries, most similar first: ``xyz (B, k, 3)``, cosine ``sim (B, k)``
    (−inf where fewer than k were found) and their row numbers ``index (B, k)`` in the database (−1 there)."""

    xyz: Tensor
    sim: Tensor
    index: Tensor

    def __post_init__(self) -> None:
        if self.xyz.dim() != 3 or self.xyz.shape[-1] != 3 or self.sim.shape != self.xyz.shape[:2]:
            raise InputError(
                f"neighbours: xyz {tuple(self.xyz.shape)} and sim {tuple(self.sim.shape)} "
                "must be (B, k, 3) and (B, k)"
            )

    def head(self, k: int) -> Neighbours:
        return Neighbours(self.xyz[:, :k], self.sim[:, :k], self.index[:, :k])

    def rows(self, sel: Tensor | slice) -> Neighbours:
        return Neighbours(self.xyz[sel], self.sim[sel], self.index[sel])


class NeighbourSearch(Protocol):
    """Anything that finds the ``k`` most similar training items of each condition row ``(B, D)``;
    ``exclude`` (B,) names one database row per query to leave out (−1: none), for fitting on items that
    are themselves in the database."""

    def search(self, cond: Tensor, k: int, exclude: Tensor | None = None) -> Neighbours: ...


class ExactNeighbours:
    """Brute-force cosine neighbours over ``features (N, D)`` with locations ``xyz (N, 3)`` (chunked
    matmul)."""

    def __init__(self, features: Tensor, xyz: Tensor) -> None:
        f = torch.as_tensor(features, dtype=torch.float32)
        if f.dim() != 2 or xyz.shape != (f.shape[0], 3):
            raise InputError(f"features {tuple(f.shape)} and xyz {tuple(xyz.shape)} do not match")
        self.features = torch.nn.functional.normalize(f, dim=-1)
        self.xyz = project(torch.as_tensor(xyz, dtype=torch.float32))

    def __len__(self) -> int:
        return self.features.shape[0]

    def search(self, cond: Tensor, k: int, exclude: Tensor | None = None) -> Neighbours:
        q = torch.nn.functional.normalize(torch.as_tensor(cond, dtype=torch.float32).to("cpu"), dim=-1)
        kk = min(k, len(self))
        sims, idxs = [], []
        for lo in range(0, q.shape[0], 1024):
            s = q[lo : lo + 1024] @ self.features.T
            if exclude is not None:
                ex = exclude[lo : lo + 1024].to(torch.long)
                rows = torch.nonzero(ex >= 0).flatten()
                s[rows, ex[rows]] = -math.inf
            v, i = s.topk(kk, dim=1)
            sims.append(v)
            idxs.append(i)
        sim, idx = torch.cat(sims), torch.cat(idxs)
        if kk < k:  # pad like faiss does when the database is smaller than k
            pad = k - kk
            sim = torch.cat([sim, sim.new_full((sim.shape[0], pad), -math.inf)], 1)
            idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], 1)
        idx = torch.where(torch.isfinite(sim), idx, torch.full_like(idx, -1))
        return Neighbours(self.xyz[idx.clamp_min(0)], sim, idx)


# ------------------------------------------------------------------------------------------ log-densities

POE_KERNEL_KM = 300.0
"""Scale of the kernel that counts the flow's draws near a neighbour (:func:`flow_support`): a region-sized
neighbourhood, well inside GeoScore's 1,493 km, so the vote separates places the answer would separate."""

POE_FLOOR = 0.1
"""Added to the flow's support before the power β: a neighbour no draw came near keeps (0.1 / 1.1)^β of its
weight relative to one every draw hit, so a handful of draws (16 by default) cannot veto the neighbours."""


def flow_support(points: Tensor, draws: Tensor, km: float = POE_KERNEL_KM) -> Tensor:
    """f ``(B, k)``: the mean over the flow's draws ``(B, n, 3)`` of exp(−d(point, draw) / ``km``) for each of
    ``points (B, k, 3)``, i.e. how much of the flow's mass lies near each point (1: every draw on it)."""
    return geoscore_kernel(points.to(torch.float32), draws.to(torch.float32), km).mean(-1)


def _vmf_log_kernel(x: Tensor, mu: Tensor, kappa: Tensor | float) -> Tensor:
    """log vMF(x; μ, κ) for ``x (B, m, 3)`` against ``mu (B, k, 3)``: ``(B, m, k)``.

    Same density as ``families.vmf_log_density``, but the exponent κ(μ·x − 1) is computed as −κ|x − μ|²/2
    from differences: at κ ~ 1e5 (kernels of a few km) the dot-product form loses the distance in float32.
    """
    kappa = torch.as_tensor(kappa, dtype=x.dtype, device=x.device)
    chord = torch.cdist(x, mu, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.log(kappa) - _LOG_2PI - torch.log(-torch.expm1(-2 * kappa)) - 0.5 * kappa * chord * chord


def kernel_kappa(sim: Tensor, params: HybridParams) -> Tensor:
    """Concentration of each neighbour's kernel ``(B, k)``: κ·exp(β·(s_k − 1)), clamped to [1e-3, 1e9]
    (missing neighbours, s = −inf, get κ at s = 0; their weight is 0)."""
    s = torch.nan_to_num(sim, neginf=0.0)
    return (params.kappa * torch.exp(params.kappa_slope * (s - 1.0))).clamp(1e-3, 1e9)


def neighbour_log_prob(x: Tensor, nb: Neighbours, params: HybridParams) -> Tensor:
    """log Σ_k w_k vMF(x; x_k, κ) for ``x (B, m, 3)``: ``(B, m)``, normalised on S² (nats per steradian)."""
    nb = nb.head(params.k)
    log_w = neighbour_log_weights(nb.sim, params.tau).to(x.dtype)
    kappa = kernel_kappa(nb.sim.to(x.dtype), params).unsqueeze(1)  # (B, 1, k)
    comp = _vmf_log_kernel(x, nb.xyz.to(x.dtype), kappa)
    return torch.logsumexp(log_w.unsqueeze(1) + comp, dim=-1)


def flow_log_weight(sim: Tensor, params: HybridParams) -> tuple[Tensor, Tensor]:
    """``(log λ, log(1 − λ))`` per item ``(B,)`` with λ = σ(a + b·s₁), s₁ = the top-1 similarity."""
    s1 = torch.nan_to_num(sim[:, 0], neginf=0.0)
    z = params.lam_a + params.lam_b * s1
    return torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)


def mixture_log_prob(flow_lp: Tensor, x: Tensor, nb: Neighbours, params: HybridParams) -> Tensor:
    """The hybrid's log-density ``(B, m)`` from the flow's ``flow_lp (B, m)`` at points ``x (B, m, 3)``."""
    log_lam, log_rest = flow_log_weight(nb.sim, params)
    nb_lp = neighbour_log_prob(x, nb, params)
    return torch.logaddexp(
        log_lam.unsqueeze(1).to(x.dtype) + flow_lp.to(x.dtype), log_rest.unsqueeze(1).to(x.dtype) + nb_lp
    )


# ----------------------------------------------------------------------------------------------- the model


class HybridGeolocator:
    """The hybrid density with the verbs of :class:`~geoloc.geolocator.Geolocator`.

    ``flow``: a Geolocator whose density lives on S² (rfm-s2, vmf, vmf-mix, uniform); ``neighbours``: a
    :class:`NeighbourSearch` over the training features it retrieves from; ``params``: :class:`HybridParams`.
    ``likelihood_config`` sets the flow's likelihood ODE (default: the flow's own), used both for
    ``log_prob`` and for exact sampling, so a sample's log-density is that of the density it came from.
    ``labeller`` labels points for the label-aware answer (needed when ``params.answer_labels > 0``).
    ``level_map`` recalibrates its regions (:class:`~geoloc.calibration.LevelMap`, fitted on validation): the
    α-region drawn or measured is the raw HDR whose level covered α of the validation truths.
    Every verb takes an optional precomputed ``neighbours=`` (a :class:`Neighbours` of at least ``k``).
    """

    def __init__(
        self,
        flow: Geolocator,
        neighbours: NeighbourSearch,
        params: HybridParams,
        likelihood_config: LikelihoodConfig | None = None,
        info: dict[str, Any] | None = None,
        labeller: Labeller | None = None,
        level_map: LevelMap | None = None,
    ) -> None:
        if flow.family.nll_space() != "sphere":
            raise ConfigError(
                f"a hybrid needs a density on S²; family {flow.family.name!r} lives in R³ "
                "(train rfm-s2 or a vMF family)"
            )
        self.flow, self.index, self.params = flow, neighbours, params
        self.likelihood_config = likelihood_config or flow.likelihood_config
        self.info = dict(info or {})
        self.labeller = labeller
        self.level_map = level_map

    def region_level(self, alpha: float) -> float:
        """The raw HDR level whose region holds ``alpha`` of the truths (``alpha`` itself when
        uncalibrated)."""
        if self.level_map is None:
            return float(alpha)
        return min(max(self.level_map.nominal_for(alpha), 1e-3), 1.0 - 1e-3)

    def calibrate_levels(self, levels: np.ndarray) -> np.ndarray:
        """Raw HDR levels of truths → the levels of the recalibrated regions (identity when uncalibrated)."""
        return (
            np.asarray(levels, dtype=np.float64)
            if self.level_map is None
            else self.level_map.calibrated(levels)
        )

    @property
    def cond_dim(self) -> int:
        return self.flow.cond_dim

    @property
    def device(self) -> torch.device:
        return self.flow.device

    def _cond(self, cond: Tensor) -> Tensor:
        return self.flow._cond(cond)

    def neighbours(self, cond: Tensor) -> Neighbours:
        """The ``k`` neighbours of each row of ``cond`` ``(B, D)``, on the flow's device."""
        nb = self.index.search(self._cond(cond), self.params.search_k)
        return Neighbours(
            nb.xyz.to(self.device, torch.float32),
            nb.sim.to(self.device, torch.float32),
            nb.index.to(self.device),
        )

    def _nb(self, cond: Tensor, neighbours: Neighbours | None) -> Neighbours:
        nb = self.neighbours(cond) if neighbours is None else neighbours
        if nb.xyz.shape[0] != cond.shape[0] or nb.xyz.shape[1] < self.params.search_k:
            raise InputError(
                f"neighbours: need ({cond.shape[0]}, >= {self.params.search_k}) rows, "
                f"got {tuple(nb.sim.shape)}"
            )
        return Neighbours(
            nb.xyz.to(self.device, torch.float32),
            nb.sim.to(self.device, torch.float32),
            nb.index.to(self.device),
        ).head(self.params.search_k)

    def flow_weight(self, cond: Tensor, neighbours: Neighbours | None = None) -> Tensor:
        """λ(c) per item ``(B,)``: the probability that a draw comes from the flow."""
        cond = self._cond(cond)
        return flow_log_weight(self._nb(cond, neighbours).sim, self.params)[0].exp()

    # --- log-densities ----------------------------------------------------------------------------------
    @torch.no_grad()
    def flow_log_prob(self, x: Tensor, cond: Tensor) -> Tensor:
        """The flow's exact log-density at ``x (B, m, 3)`` for conditions ``(B, D)``: ``(B, m)``."""
        b, m, _ = x.shape
        flat = cond.repeat_interleave(m, dim=0)
        return self.flow.log_prob(x.reshape(-1, 3), flat, self.likelihood_config).reshape(b, m)

    @torch.no_grad()
    def log_prob_points(
        self, x: Tensor, cond: Tensor, neighbours: Neighbours | None = None, flow_lp: Tensor | None = None
    ) -> Tensor:
        """Exact log-density ``(B, m)`` (nats per steradian) of ``m`` points per item ``x (B, m, 3)``.

        ``flow_lp (B, m)``: the flow's log-density at those points with this hybrid's likelihood settings,
        when the caller has it already (an evaluation that scored the flow's own row on the same truths).
        """
        cond = self._cond(cond)
        x = project(torch.as_tensor(x, dtype=torch.float32).to(self.device))
        if x.dim() != 3 or x.shape[0] != cond.shape[0]:
            raise InputError(
                f"log_prob_points: expected ({cond.shape[0]}, m, 3) points, got {tuple(x.shape)}"
            )
        nb = self._nb(cond, neighbours)
        if flow_lp is None:
            flow_lp = self.flow_log_prob(x, cond)
        elif tuple(flow_lp.shape) != tuple(x.shape[:2]):
            raise InputError(f"log_prob_points: flow_lp {tuple(flow_lp.shape)} for points {tuple(x.shape)}")
        return mixture_log_prob(flow_lp.to(self.device), x, nb, self.params)

    @torch.no_grad()
    def log_prob(self, xyz: Tensor, cond: Tensor, neighbours: Neighbours | None = None) -> Tensor:
        """Exact log-density ``(M,)`` of one point per condition (``cond`` (M, D), or one row broadcast)."""
        cond = self._cond(cond)
        xyz = torch.as_tensor(xyz, dtype=torch.float32).to(self.device)
        if cond.shape[0] == 1 and xyz.shape[0] != 1:
            nb = self._nb(cond, neighbours)
            x = xyz.unsqueeze(0)
            return self.log_prob_points(x, cond, nb)[0]
        if cond.shape[0] != xyz.shape[0]:
            raise ConfigError(f"log_prob: {xyz.shape[0]} points but {cond.shape[0]} conditions")
        return self.log_prob_points(xyz.unsqueeze(1), cond, neighbours)[:, 0]

    # --- sampling -------------------------------------------------------------------------------------
    def _flow_draws(
        self,
        cond_rows: Tensor,
        exact: bool,
        steps: int | None,
        omega: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        """One flow draw per row of ``cond_rows`` ``(M, D)``: ``(M, 3)``."""
        if cond_rows.shape[0] == 0:
            return cond_rows.new_zeros((0, 3))
        fam = self.flow.family
        if exact and isinstance(fam, OdeFamily) and omega == 0.0:
            return project(fam.sample_exact(self.flow.net, cond_rows, self.likelihood_config, generator))
        return self.flow.sample(cond_rows, 1, omega=omega, steps=steps, generator=generator)[:, 0]

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        n: int = 1,
        *,
        exact: bool = True,
        steps: int | None = None,
        omega: float = 0.0,
        generator: torch.Generator | None = None,
        neighbours: Neighbours | None = None,
    ) -> Tensor:
        """``n`` draws per item ``(B, n, 3)``: each picks the flow with probability λ(c), else a neighbour k
        with probability w_k and a vMF draw around it.

        ``exact=True`` draws flow samples with the likelihood ODE run forward (the density ``log_prob``
        reports); ``exact=False`` uses the flow's sampler (``steps``, guidance ``omega``), cheaper and what
        point estimates use.
        """
        cond = self._cond(cond)
        nb = self._nb(cond, neighbours).head(self.params.k)
        b = cond.shape[0]
        log_lam, _ = flow_log_weight(nb.sim, self.params)
        u = torch.rand((b, n), generator=generator, device=self.device)
        from_flow = u < log_lam.exp().unsqueeze(1)
        out = torch.empty((b, n, 3), dtype=torch.float32, device=self.device)
        rows = torch.nonzero(from_flow)
        out[rows[:, 0], rows[:, 1]] = self._flow_draws(cond[rows[:, 0]], exact, steps, omega, generator)
        rest = torch.nonzero(~from_flow)
        if rest.shape[0]:
            w = neighbour_log_weights(nb.sim, self.params.tau).exp()
            pick = torch.multinomial(w[rest[:, 0]], 1, generator=generator)[:, 0]
            mu = nb.xyz[rest[:, 0], pick]
            kappa = kernel_kappa(nb.sim, self.params)[rest[:, 0], pick]
            out[rest[:, 0], rest[:, 1]] = vmf_sample(mu, kappa, generator)
        return out

    @torch.no_grad()
    def sample_with_log_prob(
        self,
        cond: Tensor,
        n: int,
        generator: torch.Generator | None = None,
        neighbours: Neighbours | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``n`` exact draws per item and their exact log-densities: ``((B, n, 3), (B, n))``."""
        cond = self._cond(cond)
        nb = self._nb(cond, neighbours)
        x = self.sample(cond, n, exact=True, generator=generator, neighbours=nb)
        return x, self.log_prob_points(x, cond, nb)

    @torch.no_grad()
    def localizability(
        self,
        cond: Tensor,
        n: int = 256,
        generator: torch.Generator | None = None,
        neighbours: Neighbours | None = None,
    ) -> Tensor:
        """Negative entropy E_p[log₂ p] in bits per item ``(B,)`` from ``n`` exact samples."""
        _, lp = self.sample_with_log_prob(cond, n, generator, neighbours)
        return lp.mean(-1) / math.log(2)

    # --- point estimates ------------------------------------------------------------------------------
    @torch.no_grad()
    def geoscore_answer(
        self,
        cond: Tensor,
        n: int = 64,
        *,
        steps: int | None = 16,
        generator: torch.Generator | None = None,
        neighbours: Neighbours | None = None,
        flow_samples: Tensor | None = None,
        answer_k: int | None = None,
        answer_tau: float | None = None,
        answer_flow: float | None = None,
        answer_labels: float | None = None,
        answer_poe: float | None = None,
        pairwise: PairwiseScores | None = None,
    ) -> Tensor:
        """The point ``(B, 3)`` maximising the hybrid's expected score over the candidates (``answer_draws``
        or ``n`` flow draws ∪ the k neighbours): GeoScore / 5000, plus ``answer_labels`` × the probability
        that the candidate's country, region and city are the truth's (default: the params'; see
        :class:`HybridParams`).
        With ``answer_poe`` β > 0 the flow's draws also reweigh the neighbours (a product of experts, see
        :class:`HybridParams`); they are candidates only when the flow has a share (``answer_flow`` > 0).
        ``pairwise`` (:func:`~geoloc.retrieval.pairwise_scores` of :meth:`answer_candidates`: the draws,
        then the answer's neighbours) spares the distances and labels when many settings answer one batch.

        The expectation is Rao-Blackwellised over the component: the flow part by its ``n`` draws (weight
        λ/n each), the neighbour part by the kernels' centres (weight (1 − λ)·w_k) — a vMF of κ ≥ 1e3 is
        within ~200 km of its centre, where the GeoScore kernel (scale 1,493 km) is flat to a few percent.
        The neighbours are weighted with ``answer_k`` / ``answer_tau`` and the flow's share scaled by
        ``answer_flow`` (default: the params', see :class:`HybridParams`).
        """
        cond = self._cond(cond)
        nb = self._nb(cond, neighbours)
        scale = self.params.answer_flow if answer_flow is None else float(answer_flow)
        beta = self.params.answer_poe if answer_poe is None else float(answer_poe)
        if flow_samples is None:
            if scale == 0.0 and beta == 0.0:  # the draws would weigh nothing: no flow sampling at all
                flow_samples = cond.new_zeros((cond.shape[0], 0, 3))
            else:
                n = self.params.answer_draws or n
                steps = self.params.answer_steps or steps
                flow_samples = self.flow.sample(cond, n, omega=0.0, steps=steps, generator=generator)
        votes = flow_samples
        if scale == 0.0:  # weight 0: the draws vote (β) but are no candidates
            flow_samples = flow_samples[:, :0]
        n = flow_samples.shape[1]
        log_lam, log_rest = flow_log_weight(nb.sim, self.params)
        if scale != 1.0:
            lam = scale * log_lam.exp()
            log_lam, log_rest = torch.log(lam), torch.log1p(-lam)
        kk = answer_k or self.params.answer_k or self.params.k
        tt = answer_tau or self.params.answer_tau or self.params.tau
        alpha = self.params.answer_labels if answer_labels is None else float(answer_labels)
        if alpha > 0 and self.labeller is None:
            raise ConfigError(
                "this hybrid's answer weighs administrative labels (answer_labels > 0) but has no labeller; "
                "load it with geoloc.pipeline.fit_hybrid.load_hybrid (it attaches the gazetteer)"
            )
        if nb.sim.shape[1] < kk:
            raise InputError(f"geoscore_answer: {kk} neighbours needed, {nb.sim.shape[1]} given")
        nb = nb.head(kk)
        log_w_nb = neighbour_log_weights(nb.sim, tt)
        if beta > 0 and votes.shape[1] > 0:
            support = flow_support(nb.xyz, votes)
            log_w_nb = torch.log_softmax(log_w_nb + beta * torch.log(support + POE_FLOOR), dim=1)
        pts = torch.cat([flow_samples.to(torch.float32), nb.xyz], dim=1)
        log_w = torch.cat(
            [(log_lam - math.log(max(n, 1))).unsqueeze(1).expand(-1, n), log_rest.unsqueeze(1) + log_w_nb], 1
        )
        if pairwise is not None:
            # Listed for all draws, then the neighbours: skip the draws that are no candidates.
            return best_expected_answer(pts, log_w, None, alpha, pairwise.tail(votes.shape[1] - n))
        labels = self.point_labels(pts) if alpha > 0 else None
        return best_expected_answer(pts, log_w, labels, alpha)

    def answer_candidates(self, neighbours: Neighbours, flow_samples: Tensor) -> Tensor:
        """Every point :meth:`geoscore_answer` may answer with ``(B, n + k, 3)``: the draws, then the answer's
        k neighbours (their :func:`~geoloc.retrieval.pairwise_scores` are what ``geoscore_answer`` takes as
        ``pairwise``)."""
        kk = self.params.answer_k or self.params.k
        return torch.cat([flow_samples.to(torch.float32), neighbours.head(kk).xyz], dim=1)

    def point_labels(self, pts: Tensor) -> dict[str, Tensor]:
        """Label ids ``(B, m)`` per level of :data:`ANSWER_LEVELS` for points ``(B, m, 3)`` (by the
        labeller)."""
        if self.labeller is None:
            raise ConfigError("point_labels needs a labeller (see HybridGeolocator)")
        b, m, _ = pts.shape
        ll = xyz_to_latlon(pts.reshape(-1, 3).to(torch.float64)).cpu().numpy()
        ids = self.labeller(ll)
        return {
            lv: torch.from_numpy(np.asarray(ids[lv], dtype=np.int64)).reshape(b, m) for lv in ANSWER_LEVELS
        }

    @torch.no_grad()
    def predict(
        self,
        cond: Tensor,
        *,
        estimator: str = "geoscore",
        n: int = 64,
        steps: int | None = 16,
        omega: float | None = None,
        top_k: int = 0,
        localizability: bool = False,
        keep_samples: bool = False,
        generator: torch.Generator | None = None,
        neighbours: Neighbours | None = None,
    ) -> Prediction:
        """Point estimate per item (default: the maximum expected GeoScore, :meth:`geoscore_answer`), plus
        optional top-k modes (from ``n`` hybrid draws) and localizability.

        ``estimator="sample"`` is the paper's protocol transposed: one draw of the hybrid, whose flow part is
        guided with ``omega`` (default 2). Other estimators of ``estimators.ESTIMATORS`` run on ``n`` hybrid
        draws (flow part from the sampler with ``steps``), with exact log-densities when they need them.
        """
        cond = self._cond(cond)
        nb = self._nb(cond, neighbours)
        samples = None
        if estimator == "geoscore":
            point = self.geoscore_answer(cond, n, steps=steps, generator=generator, neighbours=nb)
        elif estimator == "sample":
            point = self.sample(
                cond,
                1,
                exact=False,
                steps=steps,
                omega=2.0 if omega is None else omega,
                generator=generator,
                neighbours=nb,
            )[:, 0]
        elif estimator in ESTIMATORS:
            samples = self.sample(
                cond,
                n,
                exact=False,
                steps=steps,
                omega=0.0 if omega is None else omega,
                generator=generator,
                neighbours=nb,
            )
            lp = (
                self.log_prob_points(samples, cond, nb)
                if ESTIMATORS[estimator].log_prob == "required"
                else None
            )
            point = ESTIMATORS[estimator](samples, lp)
        else:
            raise ConfigError(
                f"unknown estimator {estimator!r}; choose 'geoscore', 'sample' or one of {sorted(ESTIMATORS)}"
            )
        topk = None
        if top_k > 0:
            if samples is None:
                samples = self.sample(cond, n, exact=False, steps=steps, generator=generator, neighbours=nb)
            topk = top_k_modes(samples, k=top_k)
        loc = (
            self.localizability(cond, n=min(n, 256), generator=generator, neighbours=nb)
            if localizability
            else None
        )
        return Prediction(
            latlon=xyz_to_latlon(point),
            xyz=point,
            topk=topk,
            localizability=loc,
            samples=samples if keep_samples else None,
        )


# ---------------------------------------------------------------------------------------------- fitting


ANSWER_FLOW_SHARES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
"""Flow shares :func:`fit_answer_flow` scans (0: the neighbours alone, i.e. the weighted retrieval answer)."""

ANSWER_LABEL_WEIGHTS = (0.0, 0.03, 0.1, 0.25, 0.5, 1.0)
"""Label weights it scans when a labeller is there: small ones break near-ties in expected GeoScore in
favour of the likely country / region / city, large ones trade distance for labels."""

ANSWER_POE_BETAS = (0.0, 0.25, 0.5, 1.0, 2.0)
"""Powers β of the flow's vote on the neighbours (:attr:`HybridParams.answer_poe`) it scans (0: no vote)."""


def _paired_z(diff: Tensor) -> float:
    """Mean of a paired per-item difference in standard errors (0 when nothing differs)."""
    se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else 0.0
    return float(diff.mean()) / se if se > 0 else 0.0


def fit_answer_flow(
    model: HybridGeolocator,
    cond: Tensor,
    truth: Tensor,
    neighbours: Neighbours,
    flow_samples: Tensor,
    scales: Sequence[float] = ANSWER_FLOW_SHARES,
    label_weights: Sequence[float] = ANSWER_LABEL_WEIGHTS,
    poe_betas: Sequence[float] = ANSWER_POE_BETAS,
) -> dict[str, Any]:
    """Choose :attr:`HybridParams.answer_flow`, :attr:`HybridParams.answer_poe` and (when the model has a
    labeller) :attr:`HybridParams.answer_labels` on validation truths ``(V, 3)``, given each item's neighbours
    (own row excluded) and flow draws ``(V, n, 3)`` (drawn once and reused for every setting). The flow
    either shares the answer (s > 0) or votes on the neighbours (β > 0); both are scanned with every label
    weight.

    The criterion is the comparison the answer is judged by: it must beat the neighbours' own answer (s = 0,
    β = 0, label weight 0: the weighted retrieval row) on *every* column of the table — GeoScore and, with a
    labeller, the country, region and city accuracies of :data:`ANSWER_LEVELS`. Each setting's per-item
    difference to that answer is turned into a paired z-score per column, and the setting whose weakest
    column has the highest z wins (ties: the larger sum of the columns, GeoScore / 5000 + accuracies). Why
    not the best sum: a large label weight buys accuracy with distance (the label mode is not the point
    closest on average), so the best sum loses GeoScore to retrieval; the weakest-column rule keeps the
    retrieval answer (all z = 0) unless a setting is better everywhere. Returns ``{"answer_flow",
    "answer_poe", "answer_labels", "geoscore", "accuracy", "score", "z", "min_z", "geoscore_z", "grid"}``.
    """
    rate = EARTH_RADIUS_KM / GEOSCORE_SCALE_KM
    truth = project(truth.to(torch.float32))
    labelled = model.labeller is not None
    truth_labels = model.point_labels(truth.unsqueeze(1)) if labelled else {}
    alphas = [float(a) for a in (label_weights if labelled else (0.0,))]
    settings = [(0.0, 0.0, 0.0)]
    for s, b in [(float(s), 0.0) for s in scales] + [(0.0, float(b)) for b in poe_betas if b > 0]:
        settings += [(s, b, a) for a in alphas if (s, b, a) not in settings]
    grid: list[dict[str, Any]] = []
    base: dict[str, Tensor] = {}
    cands = model.answer_candidates(neighbours, flow_samples)
    cand_labels = model.point_labels(cands) if labelled else {}
    pairwise = pairwise_scores(cands, cand_labels or None)
    rows = torch.arange(cands.shape[0])
    for s, b, a in settings:
        ans = model.geoscore_answer(
            cond,
            neighbours=neighbours,
            flow_samples=flow_samples,
            answer_flow=s,
            answer_labels=a,
            answer_poe=b,
            pairwise=pairwise,
        )
        theta = angle(ans.to(torch.float64), truth.to(ans.device, torch.float64))
        cols = {"geoscore": GEOSCORE_MAX * torch.exp(-rate * theta).cpu()}
        if labelled:  # the answer is one of the candidates: take its labels from theirs
            pick = (cands - ans.unsqueeze(1).to(cands.dtype)).abs().sum(-1).argmin(1)
            for lv in ANSWER_LEVELS:
                got = cand_labels[lv][rows, pick]
                cols[lv] = ((got == truth_labels[lv][:, 0]) & (truth_labels[lv][:, 0] >= 0)).double()
        base = base or cols
        z = {c: _paired_z(v - base[c]) for c, v in cols.items()}
        acc = {lv: float(cols[lv].mean()) for lv in ANSWER_LEVELS if lv in cols}
        gs = float(cols["geoscore"].mean())
        grid.append(
            {
                "answer_flow": s,
                "answer_poe": b,
                "answer_labels": a,
                "geoscore": gs,
                "accuracy": acc,
                "score": gs / GEOSCORE_MAX + sum(acc.values()) if labelled else gs,
                "z": z,
                "min_z": min(z.values()),
                "geoscore_z": z["geoscore"],
            }
        )
    best = max(grid, key=lambda r: (r["min_z"], r["score"]))
    return {**best, "grid": grid}


@dataclass
class FitResult:
    """The fitted parameters, the validation NLL (nats per steradian, mean over items) at them, and the
    NLL of the flow alone and of the best pure-neighbour mixture for comparison, plus the k scanned."""

    params: HybridParams
    nll: float
    flow_nll: float
    per_k: dict[int, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params.to_json(),
            "nll": self.nll,
            "flow_nll": self.flow_nll,
            "per_k": {str(k): v for k, v in self.per_k.items()},
        }


def fit_hybrid_params(
    flow_lp: Tensor,
    truth: Tensor,
    nb: Neighbours,
    ks: Sequence[int] = (4, 8, 16, 32, 64),
    *,
    logistic: bool = True,
    slope: bool = True,
    iters: int = 200,
) -> FitResult:
    """Fit (τ, κ, a, b) for each k in ``ks`` by maximum likelihood of the truth, keep the best k.

    ``flow_lp (V,)``: the flow's exact log-density at each validation item's true location ``truth (V, 3)``;
    ``nb``: its neighbours (its own row excluded). The objective is the exact mixture log-density, smooth in
    (log τ, log κ, a, b, β), so it is maximised by L-BFGS from a few starts (κ from city to country scale).
    ``logistic=False`` fixes b = 0 (one λ for every item); ``slope=False`` fixes β = 0 (one κ).
    """
    truth = project(truth.to(torch.float64)).unsqueeze(1)
    flow_lp = flow_lp.to(torch.float64)
    if flow_lp.shape != (truth.shape[0],) or nb.sim.shape[0] != truth.shape[0]:
        raise InputError(
            f"fit: flow_lp {tuple(flow_lp.shape)}, truth {tuple(truth.shape)} and neighbours "
            f"{tuple(nb.sim.shape)} must describe the same items"
        )
    flow_nll = float(-flow_lp.mean())
    best: FitResult | None = None
    per_k: dict[int, dict[str, float]] = {}
    for k in ks:
        if k > nb.sim.shape[1]:
            continue
        sub = nb.head(k)
        sim = sub.sim.to(torch.float64)
        s1 = torch.nan_to_num(sim[:, 0], neginf=0.0)
        chord2 = (
            torch.cdist(truth, sub.xyz.to(torch.float64), compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
            ** 2
        )

        s0 = torch.nan_to_num(sim, neginf=0.0) - 1.0

        def nll(
            theta: Tensor, sim: Tensor = sim, s1: Tensor = s1, chord2: Tensor = chord2, s0: Tensor = s0
        ) -> Tensor:
            log_tau, log_kappa0, a, b, beta = theta
            log_kappa = (log_kappa0 + (beta if slope else 0.0) * s0).clamp(math.log(1e-3), math.log(1e9))
            kappa = log_kappa.exp()
            log_w = torch.log_softmax(sim / log_tau.exp(), dim=1)
            log_k = log_kappa - _LOG_2PI - torch.log(-torch.expm1(-2 * kappa)) - 0.5 * kappa * chord2
            nb_lp = torch.logsumexp(log_w + log_k, dim=1)
            z = a + (b if logistic else 0.0) * s1
            lp = torch.logaddexp(
                torch.nn.functional.logsigmoid(z) + flow_lp, torch.nn.functional.logsigmoid(-z) + nb_lp
            )
            return -lp.mean()

        best_k: tuple[float, Tensor] | None = None
        for kappa0 in (1e2, 1e3, 1e4, 1e5):
            theta = torch.tensor(
                [math.log(0.05), math.log(kappa0), 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True
            )
            opt = torch.optim.LBFGS([theta], max_iter=iters, line_search_fn="strong_wolfe")

            def closure(theta: Tensor = theta, opt: torch.optim.LBFGS = opt) -> Tensor:
                opt.zero_grad()
                loss = nll(theta)
                loss.backward()
                return loss

            with torch.enable_grad():
                opt.step(closure)
            with torch.no_grad():
                theta.data[0].clamp_(math.log(1e-4), math.log(10.0))
                theta.data[1].clamp_(math.log(1.0), math.log(1e8))
                val = float(nll(theta))
            if math.isfinite(val) and (best_k is None or val < best_k[0]):
                best_k = (val, theta.detach().clone())
        if best_k is None:
            continue
        val, th = best_k
        params = HybridParams(
            k=k,
            tau=float(th[0].exp()),
            kappa=float(th[1].exp()),
            lam_a=float(th[2]),
            lam_b=float(th[3]) if logistic else 0.0,
            kappa_slope=float(th[4]) if slope else 0.0,
        )
        per_k[k] = {"nll": val, **params.to_json()}
        if best is None or val < best.nll:
            best = FitResult(params, val, flow_nll, per_k)
    if best is None:
        raise InputError(f"fit: no k in {list(ks)} fits the {nb.sim.shape[1]} neighbours given")
    return replace(best, per_k=per_k)
