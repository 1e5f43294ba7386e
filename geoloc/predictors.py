"""The rows of an evaluation table: what predicts a location for a batch of embeddings.

A row is a name and a :class:`Predictor`. Kept apart from :mod:`geoloc.evaluate` (the data pass and the
scoring) so that a new kind of row — another baseline, a hybrid model, another estimator — is one class here
and one line where the rows are built (``pipeline/eval_job.py``), and the pass does not change.

Everything here takes arrays and tensors: the retrieval baseline is built from embeddings and locations
(:class:`RetrievalBuilder`), never from a store; reading a store into it is the pipeline's job.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import asdict, replace
from typing import Any, Protocol

import faiss
import numpy as np
import torch

from geoloc.config import RETRIEVAL_INDEXES, EvalConfig, FamilyConfig, ModelConfig
from geoloc.errors import ConfigError, InputError
from geoloc.estimators import ESTIMATORS
from geoloc.families import Family, OdeFamily
from geoloc.geolocator import Geolocator
from geoloc.hybrid import HybridGeolocator, Neighbours
from geoloc.retrieval import fit_weighted_retrieval, weighted_retrieval
from geoloc.sphere import latlon_to_xyz, xyz_to_latlon

__all__ = [
    "GeolocatorPredictor",
    "HybridPredictor",
    "Predictor",
    "RetrievalBuilder",
    "RetrievalPredictor",
    "uniform_geolocator",
]


class Predictor(Protocol):
    """What :func:`geoloc.evaluate.evaluate` needs from a row of the table.

    ``predict`` returns ``(B, 2)`` float64 degrees with NaN rows for failed predictions; ``log_prob`` the
    natural-log density of the true points ``xyz (B, 3)`` (or None: no density); ``localizability`` bits per
    item (or None); ``sample_log_prob`` the exact log-densities ``(B, n)`` of n exact draws per item (or
    None), from which the evaluator gets each truth's HDR level (calibration). ``deterministic`` predictors
    are run for the first seed only. ``expects`` is the backbone the predictor was built for,
    ``(name or None, dim or None)``, checked against the data.
    """

    deterministic: bool
    nll_space: str | None

    @property
    def expects(self) -> tuple[str | None, int | None]: ...

    def info(self) -> dict[str, Any]: ...

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray: ...

    def log_prob(self, xyz: torch.Tensor, cond: torch.Tensor) -> np.ndarray | None: ...

    def localizability(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None: ...

    def sample_log_prob(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None: ...

    def generator(self, seed: int) -> torch.Generator: ...


class GeolocatorPredictor:
    """A :class:`~geoloc.geolocator.Geolocator` with the evaluation's estimator, guidance and sampler."""

    deterministic = False

    def __init__(
        self, geo: Geolocator, config: EvalConfig, *, kind: str = "checkpoint", source: str = ""
    ) -> None:
        # A shallow copy, so the evaluation's sampler settings do not leak into the caller's object.
        self.geo = copy.copy(geo)
        self.geo.sample_config = replace(geo.sample_config, steps=config.steps, method=config.method)
        self.geo.likelihood_config = config.likelihood
        self.config = config
        self.kind, self.source = kind, source
        self.omega = config.effective_omega()
        self.nll_space = geo.family.nll_space()
        self._estimator = None if config.estimator == "sample" else ESTIMATORS[config.estimator]
        # Rows built from one loaded model (one per estimator) share its density: NLL and calibration once.
        self.density_key = ("geolocator", id(geo.net))
        # The log-density at the last batch's truths, kept (with the very tensors it was computed at) for a
        # hybrid row on the same flow (HybridPredictor.reuse_flow_of): one likelihood solve per truth.
        self.last_truths: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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
            "train_steps": (cfg.get("train") or {}).get("steps")
            if isinstance(cfg.get("train"), dict)
            else None,
            "estimator": self.config.estimator,
            "omega": self.omega,
            "steps": self.config.steps,
            "method": self.config.method,
            "n": None if self.config.estimator == "sample" else self.config.n,
            # vMF families answer "sample" with their mean direction (# reference differs: a random draw).
            "point": "mean direction"
            if self.config.estimator == "sample" and _has_closed_form_point(self.geo)
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

    @functools.cached_property
    def flow_key(self) -> tuple[str, str] | None:
        """:func:`flow_density_key` of this row's model (computed on first use: it hashes the weights)."""
        return flow_density_key(self.geo)

    def log_prob(self, xyz: torch.Tensor, cond: torch.Tensor) -> np.ndarray | None:
        lp = self.geo.log_prob(xyz, cond).detach()
        self.last_truths = (xyz, cond, lp)
        return lp.to("cpu", torch.float64).numpy()

    def localizability(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None:
        loc = self.geo.localizability(cond, n=self.config.localizability_n, generator=generator)
        return loc.detach().to("cpu", torch.float64).numpy()

    @torch.no_grad()
    def sample_log_prob(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None:
        """Exact log-densities ``(B, n)`` of ``calibration_n`` exact draws (the likelihood ODE run forward for
        flows, so a draw's density is the one ``log_prob`` reports at the truth)."""
        geo, n = self.geo, self.config.calibration_n
        cond = geo._cond(cond)
        flat = cond.repeat_interleave(n, dim=0)
        if isinstance(geo.family, OdeFamily):
            x = geo.family.sample_exact(geo.net, flat, geo.likelihood_config, generator)
        else:
            x = geo.family.sample(geo.net, cond, n, geo.sample_config, generator).reshape(-1, 3)
        lp = geo.family.log_prob(geo.net, x, flat, geo.likelihood_config)
        return lp.reshape(cond.shape[0], n).detach().to("cpu", torch.float64).numpy()


class HybridPredictor:
    """A :class:`~geoloc.hybrid.HybridGeolocator` (flow ⊕ neighbour kernels) as a table row.

    ``geoscore`` is the hybrid's own answer (the max-expected-GeoScore point over ``n`` flow draws ∪ its
    neighbours, the product default); ``sample`` is the paper's protocol transposed (one hybrid draw, its flow
    part guided with ω); the other estimators run on ``n`` hybrid draws. The flow's likelihood ODE is the
    evaluation's (as for the flow's own row, so their NLLs compare). The neighbours of a batch are searched
    once and reused by every verb of that batch.
    """

    deterministic = False
    nll_space = "sphere"

    def __init__(self, hybrid: HybridGeolocator, config: EvalConfig, *, source: str = "") -> None:
        # A shallow copy of the flow, so the evaluation's sampler settings do not leak into the caller's.
        flow = copy.copy(hybrid.flow)
        flow.sample_config = replace(flow.sample_config, steps=config.steps, method=config.method)
        flow.likelihood_config = config.likelihood
        self.hybrid = HybridGeolocator(
            flow,
            hybrid.index,
            hybrid.params,
            config.likelihood,
            hybrid.info,
            labeller=hybrid.labeller,
            level_map=hybrid.level_map,
        )
        self.config, self.source = config, source
        self._last: tuple[torch.Tensor, Neighbours] | None = None
        self.density_key = ("hybrid", id(hybrid))
        self._flow_row: GeolocatorPredictor | None = None

    @property
    def expects(self) -> tuple[str | None, int | None]:
        bb = self.hybrid.flow.backbone
        return (bb.get("name") or None), int(self.hybrid.cond_dim)

    def info(self) -> dict[str, Any]:
        est = self.config.estimator
        return {
            "kind": "hybrid",
            "source": self.source,
            "family": f"hybrid({self.hybrid.flow.family.name})",
            "backbone": self.hybrid.flow.backbone or None,
            "params": self.hybrid.params.to_json(),
            "estimator": est,
            "omega": self.config.effective_omega(),
            "steps": self.config.steps,
            "method": self.config.method,
            "n": None if est == "sample" else self.config.n,
        }

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.hybrid.device).manual_seed(int(seed))

    def _nb(self, cond: torch.Tensor) -> Neighbours:
        if self._last is None or self._last[0] is not cond:
            self._last = (cond, self.hybrid.neighbours(cond))
        return self._last[1]

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray:
        est = self.config.estimator
        pred = self.hybrid.predict(
            cond,
            estimator=est,
            n=self.config.n,
            steps=self.config.steps,
            omega=self.config.effective_omega(),
            generator=generator,
            neighbours=self._nb(cond),
        )
        out = pred.latlon.detach().to("cpu", torch.float64).numpy()
        out[~np.isfinite(out).all(axis=1)] = np.nan  # a non-finite draw is one counted miss
        return out

    @functools.cached_property
    def flow_key(self) -> tuple[str, str] | None:
        """:func:`flow_density_key` of the flow inside (with the evaluation's likelihood settings)."""
        return flow_density_key(self.hybrid.flow)

    def reuse_flow_of(self, row: GeolocatorPredictor) -> None:
        """Take the flow's log-density at the truths from ``row`` (the same flow's own row, scored first on
        each batch) instead of solving its likelihood ODE again; checked by :attr:`flow_key`."""
        if row.flow_key != self.flow_key:
            raise ConfigError("reuse_flow_of: that row's flow has other weights or likelihood settings")
        self._flow_row = row

    def log_prob(self, xyz: torch.Tensor, cond: torch.Tensor) -> np.ndarray | None:
        flow_lp = None
        last = self._flow_row.last_truths if self._flow_row is not None else None
        if last is not None and last[0] is xyz and last[1] is cond:
            flow_lp = last[2].unsqueeze(1)
        lp = self.hybrid.log_prob_points(xyz.unsqueeze(1), cond, self._nb(cond), flow_lp=flow_lp)[:, 0]
        return lp.detach().to("cpu", torch.float64).numpy()

    def localizability(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None:
        loc = self.hybrid.localizability(
            cond, n=self.config.localizability_n, generator=generator, neighbours=self._nb(cond)
        )
        return loc.detach().to("cpu", torch.float64).numpy()

    def calibrate_levels(self, levels: np.ndarray) -> np.ndarray:
        """The regions a hybrid reports are recalibrated on validation (its level map), so are its levels."""
        return self.hybrid.calibrate_levels(levels)

    def sample_log_prob(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None:
        _, lp = self.hybrid.sample_with_log_prob(
            cond, self.config.calibration_n, generator=generator, neighbours=self._nb(cond)
        )
        return lp.detach().to("cpu", torch.float64).numpy()


def flow_density_key(geo: Geolocator) -> tuple[str, str] | None:
    """What fixes a flow's log-densities: a digest of its weights and its likelihood settings. Two rows with
    the same key (a flow's own row and a hybrid built on the same checkpoint, each loaded separately) compute
    the same numbers at the same points. None for closed-form families: their densities cost nothing to
    recompute, so there is nothing worth sharing."""
    if not isinstance(geo.family, OdeFamily):
        return None
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(geo.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), repr(sorted(asdict(geo.likelihood_config).items()))


def _has_closed_form_point(geo: Geolocator) -> bool:
    return type(geo.family).point is not Family.point


def uniform_geolocator(cond_dim: int) -> Geolocator:
    """The uniform distribution on S² as a Geolocator (the paper's "Uniform" row); nothing to load."""
    return Geolocator.build(
        FamilyConfig(name="uniform"),
        ModelConfig(),
        int(cond_dim),
        config={"family": {"name": "uniform"}, "cond_dim": int(cond_dim)},
    )


class RetrievalPredictor:
    """Nearest-neighbour retrieval (the paper's "retrieval" row): the location of the most similar training
    embedding by cosine similarity (faiss inner product on L2-normalised float32 vectors).

    With ``k > 1`` it is the weighted-neighbour row of issue 13: the ``k`` most similar training items
    weighted by ``softmax(sim / tau)``, answering with the neighbour that maximises expected GeoScore
    (:func:`geoloc.retrieval.weighted_retrieval`); :meth:`weighted` makes one sharing the same index, and
    :meth:`fit_weights` chooses ``k`` and ``tau`` on held-out items of the database.

    ``flat`` is exact; ``hnsw`` (M = 32, efSearch = 128) is approximate and much faster on millions of rows.
    Build one with :class:`RetrievalBuilder` (batch by batch) or :meth:`from_arrays`.
    """

    deterministic = True
    nll_space = None

    def __init__(
        self,
        index: Any,
        latlon: np.ndarray,
        *,
        backbone: tuple[str | None, int | None],
        source: str = "",
        kind: str = "flat",
        k: int = 1,
        tau: float = 0.05,
        fit: dict[str, Any] | None = None,
    ) -> None:
        if index.ntotal != len(latlon):
            raise InputError(f"retrieval index holds {index.ntotal} vectors but {len(latlon)} locations")
        if k < 1 or not tau > 0:
            raise ConfigError(f"retrieval needs k >= 1 and tau > 0, got k={k}, tau={tau}")
        self.index, self.latlon = index, np.asarray(latlon, dtype=np.float64)
        self._backbone, self.source, self.index_kind = backbone, source, kind
        self.k, self.tau, self.fit = int(k), float(tau), fit
        self._xyz: torch.Tensor | None = None

    @classmethod
    def from_arrays(
        cls,
        emb: np.ndarray | torch.Tensor,
        latlon: np.ndarray,
        *,
        index: str = "flat",
        backbone: tuple[str | None, int | None] = (None, None),
        source: str = "arrays",
    ) -> RetrievalPredictor:
        """A retrieval row over the embeddings ``emb (N, D)`` located at ``latlon (N, 2)`` degrees."""
        emb = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
        builder = RetrievalBuilder(emb.shape[1], index)
        builder.add(emb, latlon)
        return builder.build(backbone=backbone, source=source)

    def weighted(self, k: int, tau: float, fit: dict[str, Any] | None = None) -> RetrievalPredictor:
        """The weighted-neighbour row over the same index (nothing is copied)."""
        return RetrievalPredictor(
            self.index,
            self.latlon,
            backbone=self._backbone,
            source=self.source,
            kind=self.index_kind,
            k=k,
            tau=tau,
            fit=fit,
        )

    @property
    def xyz(self) -> torch.Tensor:
        """The database's unit vectors ``(N, 3)`` (made once, on first use)."""
        if self._xyz is None:
            self._xyz = latlon_to_xyz(torch.from_numpy(self.latlon)).float()
        return self._xyz

    def neighbours(self, cond: torch.Tensor, k: int, exclude: np.ndarray | None = None) -> Neighbours:
        """The ``k`` most similar database rows of each query, most similar first; ``exclude`` (B,) names
        one row per query to leave out (its own row, for fitting on database items; −1: none)."""
        q = np.ascontiguousarray(cond.detach().to("cpu", torch.float32).numpy())
        faiss.normalize_L2(q)
        sim, idx = self.index.search(q, k + (exclude is not None))
        if exclude is not None:
            keep = idx != np.asarray(exclude)[:, None]
            # Drop the excluded row where it was found, else the last (the k+1-th) hit.
            keep[keep.all(axis=1), -1] = False
            sim = sim[keep].reshape(len(q), k)
            idx = idx[keep].reshape(len(q), k)
        ok = idx >= 0  # faiss answers -1 when it finds nothing (an empty HNSW neighbourhood)
        xyz = self.xyz[np.where(ok, idx, 0)]
        sim_t = torch.from_numpy(np.where(ok, sim, -np.inf).astype(np.float32))
        return Neighbours(xyz, sim_t, torch.from_numpy(idx))

    def fit_weights(
        self,
        cond: torch.Tensor,
        rows: np.ndarray,
        ks: tuple[int, ...] = (1, 4, 8, 16, 32, 64),
        taus: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2),
    ) -> RetrievalPredictor:
        """The weighted row with ``k`` and ``tau`` chosen by mean GeoScore on database items ``cond`` (their
        database rows ``rows``, each left out of its own search): a validation fit that never sees the
        evaluated split."""
        nb = self.neighbours(cond, min(max(ks), int(self.index.ntotal) - 1), exclude=rows)
        truth = self.xyz[np.asarray(rows)]
        fit = fit_weighted_retrieval(nb.xyz, nb.sim, truth, ks=ks, taus=taus)
        fit = {**{k: v for k, v in fit.items() if k != "grid"}, "items": len(rows), "how": "leave-one-out"}
        return self.weighted(fit["k"], fit["tau"], fit)

    @property
    def expects(self) -> tuple[str | None, int | None]:
        return self._backbone

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "retrieval",
            "source": self.source,
            "index": self.index_kind,
            "database_rows": int(self.index.ntotal),
            "estimator": "nearest neighbour (cosine)",
        }
        if self.k > 1:
            out |= {
                "kind": "retrieval-weighted",
                "estimator": "max expected GeoScore over k neighbours weighted by softmax(sim / tau)",
                "k": self.k,
                "tau": self.tau,
                "fit": self.fit,
            }
        return out

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(seed))

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray:
        nb = self.neighbours(cond, min(self.k, int(self.index.ntotal)))
        out = np.full((cond.shape[0], 2), np.nan)
        ok = (nb.index[:, 0] >= 0).numpy()
        if self.k == 1:
            hit = nb.index[:, 0].numpy()
            out[ok] = self.latlon[hit[ok]]
        elif ok.any():
            point = weighted_retrieval(nb.xyz[ok], nb.sim[ok], self.tau, self.k)
            out[ok] = xyz_to_latlon(point).to(torch.float64).numpy()
        return out

    def log_prob(self, xyz: torch.Tensor, cond: torch.Tensor) -> np.ndarray | None:
        return None

    def localizability(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None:
        return None

    def sample_log_prob(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None:
        return None


class RetrievalBuilder:
    """Fills a faiss index batch by batch (a database may not fit in memory twice), then makes the row."""

    def __init__(self, dim: int, index: str = "flat") -> None:
        if index not in RETRIEVAL_INDEXES:
            raise ConfigError(
                f"unknown retrieval index {index!r}; choose from {', '.join(RETRIEVAL_INDEXES)}"
            )
        if index == "hnsw":
            self.index = faiss.IndexHNSWFlat(int(dim), 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = 80
            self.index.hnsw.efSearch = 128
        else:
            self.index = faiss.IndexFlatIP(int(dim))
        self.kind = index
        self._latlon: list[np.ndarray] = []

    def add(self, emb: np.ndarray | torch.Tensor, latlon: np.ndarray) -> None:
        """Add embeddings ``(B, D)`` and their locations ``(B, 2)`` degrees."""
        x = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else emb
        x = np.array(x, dtype=np.float32, order="C")  # a copy: normalize_L2 works in place
        if len(x) != len(latlon):
            raise InputError(f"retrieval database: {len(x)} embeddings but {len(latlon)} locations")
        faiss.normalize_L2(x)
        self.index.add(x)
        self._latlon.append(np.asarray(latlon, dtype=np.float64))

    def build(self, *, backbone: tuple[str | None, int | None], source: str = "") -> RetrievalPredictor:
        latlon = np.concatenate(self._latlon) if self._latlon else np.empty((0, 2))
        return RetrievalPredictor(self.index, latlon, backbone=backbone, source=source, kind=self.kind)
