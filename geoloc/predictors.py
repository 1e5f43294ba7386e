"""The rows of an evaluation table: what predicts a location for a batch of embeddings.

A row is a name and a :class:`Predictor`. Kept apart from :mod:`geoloc.evaluate` (the data pass and the
scoring) so that a new kind of row — another baseline, a hybrid model, another estimator — is one class here
and one line where the rows are built (``pipeline/eval_job.py``), and the pass does not change.

Everything here takes arrays and tensors: the retrieval baseline is built from embeddings and locations
(:class:`RetrievalBuilder`), never from a store; reading a store into it is the pipeline's job.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Protocol

import faiss
import numpy as np
import torch

from geoloc.config import RETRIEVAL_INDEXES, EvalConfig, FamilyConfig, ModelConfig
from geoloc.errors import ConfigError, InputError
from geoloc.estimators import ESTIMATORS
from geoloc.families import Family
from geoloc.geolocator import Geolocator
from geoloc.sphere import xyz_to_latlon

__all__ = [
    "GeolocatorPredictor",
    "Predictor",
    "RetrievalBuilder",
    "RetrievalPredictor",
    "uniform_geolocator",
]


class Predictor(Protocol):
    """What :func:`geoloc.evaluate.evaluate` needs from a row of the table.

    ``predict`` returns ``(B, 2)`` float64 degrees with NaN rows for failed predictions; ``log_prob`` the
    natural-log density of the true points ``xyz (B, 3)`` (or None: no density); ``localizability`` bits per
    item (or None). ``deterministic`` predictors are run for the first seed only. ``expects`` is the
    backbone the predictor was built for, ``(name or None, dim or None)``, checked against the data.
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

    def log_prob(self, xyz: torch.Tensor, cond: torch.Tensor) -> np.ndarray | None:
        return self.geo.log_prob(xyz, cond).detach().to("cpu", torch.float64).numpy()

    def localizability(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray | None:
        loc = self.geo.localizability(cond, n=self.config.localizability_n, generator=generator)
        return loc.detach().to("cpu", torch.float64).numpy()


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
    ) -> None:
        if index.ntotal != len(latlon):
            raise InputError(f"retrieval index holds {index.ntotal} vectors but {len(latlon)} locations")
        self.index, self.latlon = index, np.asarray(latlon, dtype=np.float64)
        self._backbone, self.source, self.index_kind = backbone, source, kind

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

    @property
    def expects(self) -> tuple[str | None, int | None]:
        return self._backbone

    def info(self) -> dict[str, Any]:
        return {
            "kind": "retrieval",
            "source": self.source,
            "index": self.index_kind,
            "database_rows": int(self.index.ntotal),
            "estimator": "nearest neighbour (cosine)",
        }

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(seed))

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None) -> np.ndarray:
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
