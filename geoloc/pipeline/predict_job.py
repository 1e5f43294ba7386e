"""Predict where images (or place names) are, with a checkpoint: the Python API behind ``geoloc predict``.

A :class:`Predictor` is a checkpoint's :class:`~geoloc.geolocator.Geolocator` plus the backbone its
``config.json`` names (the features it was trained on) plus the GeoNames gazetteer for place names. This job
brings the embeddings (reads files, folders, manifests and texts, runs the backbone); the core
(:class:`geoloc.predict.EmbeddingPredictor`) turns them into answers: the point estimate, the top-k distinct
locations with their probability mass, optionally the localizability, and the nearest place of each. Bad
inputs (an unreadable file, an undecodable image, an empty text) become an :class:`ItemPrediction` with
``error`` set; the batch goes on. :func:`write_maps` draws density maps of the results.

Example::

    from geoloc.pipeline.predict_job import Predictor

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
import itertools
import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from geoloc.config import DensityConfig, MapOptions, PredictOptions
from geoloc.density import density_maps
from geoloc.devices import resolve_device
from geoloc.errors import CheckpointError, ConfigError, InputError
from geoloc.export import density_features, density_rows
from geoloc.files import atomic_write
from geoloc.gazetteer import Gazetteer
from geoloc.geolocator import Geolocator
from geoloc.hybrid_bound import bind_batch
from geoloc.maps import map_title, render_html, render_png
from geoloc.pipeline.backbones import load_backbone as _load_backbone
from geoloc.pipeline.fit_hybrid import HYBRID_FILE, load_hybrid
from geoloc.pipeline.items import Failure, Item
from geoloc.pipeline.manifests import load_manifest
from geoloc.pipeline.readers import iter_items
from geoloc.predict import EmbeddingPredictor, ItemPrediction, Mode, Place
from geoloc.progress import progress_bar
from geoloc.sphere import xyz_to_latlon

__all__ = [
    "IMAGE_SUFFIXES",
    "ItemPrediction",
    "Mode",
    "Place",
    "PredictOptions",
    "PredictSummary",
    "Predictor",
    "check_outputs",
    "collect_inputs",
    "collect_records",
    "is_hybrid",
    "load_predictor",
    "read_texts",
    "run_predict",
    "summarize",
    "write_density_cells",
    "write_maps",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
DENSITY_SUFFIXES = (".geojson", ".json", ".parquet", ".pq")
STDIN = "-"
"""An input (or ``--text`` / ``--text-file`` value) that means: read one entry per line from stdin."""
_MODEL_CHUNK = 8
_FAILURE_LINES = 50
"""Failed items listed one per line on stderr; the rest are counted (every one is a row of the outputs)."""
"""Items per model call inside a backbone batch: the progress bar moves (with an ETA) every few items even
when one batch of 32 takes minutes of sampling on a CPU."""


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
            out.append(
                Item(
                    id=f"bytes-{i:05d}",
                    split="",
                    lat=math.nan,
                    lon=math.nan,
                    payload=bytes(x),
                    source=f"input {i}",
                )
            )
        elif hasattr(x, "save") and hasattr(x, "mode"):  # a PIL image: encode it losslessly
            buf = io.BytesIO()
            x.save(buf, format="PNG")
            out.append(
                Item(
                    id=f"image-{i:05d}",
                    split="",
                    lat=math.nan,
                    lon=math.nan,
                    payload=buf.getvalue(),
                    source=f"input {i} (PIL image)",
                )
            )
        else:
            raise InputError(
                f"input {i}: cannot use a {type(x).__name__}; give paths, bytes, PIL images or texts"
            )
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


class Predictor(EmbeddingPredictor):
    """A checkpoint ready to answer: geolocator + backbone + gazetteer (see the module docstring)."""

    def __init__(self, geolocator: Any, backbone: Any = None, gazetteer: Any = None) -> None:
        super().__init__(geolocator, gazetteer)
        self.backbone = backbone

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
        verify_store: bool = True,
    ) -> Predictor:
        """Load a checkpoint directory and the backbone its ``config.json`` records.

        A directory holding ``hybrid.json`` loads the hybrid (:func:`~geoloc.pipeline.fit_hybrid.load_hybrid`:
        the flow checkpoint it names, its neighbour index, the store identity checked unless
        ``verify_store=False``); the backbone is the flow's. ``backbone`` overrides the recorded name (for
        checkpoints trained on imported features, which record none); ``weights``: local backbone weights
        instead of the offline Hugging Face cache. ``load_backbone=False`` gives a predictor for embeddings
        only (:meth:`predict_embeddings`).
        """
        dev = str(resolve_device(device))
        if is_hybrid(checkpoint):
            geo: Any = load_hybrid(checkpoint, device=dev, verify_store=verify_store)
            recorded = geo.flow.backbone
        else:
            geo = Geolocator.from_pretrained(checkpoint, device=dev)
            recorded = geo.backbone
        bb = None
        if load_backbone:
            name = backbone or recorded.get("name")
            if not name:
                raise CheckpointError(
                    f"{checkpoint}/config.json records no backbone; pass --backbone NAME "
                    "(the one whose features the model was trained on)"
                )
            bb = _load_backbone(name, weights).to(dev, dtype)
            if bb.dim != geo.cond_dim:
                raise CheckpointError(
                    f"{checkpoint}: the model takes {geo.cond_dim}-d features but backbone "
                    f"{name!r} gives {bb.dim}-d; pass the backbone it was trained with"
                )
            want = recorded.get("revision") if recorded.get("name") == name else None
            if want and bb.revision != want:
                warnings.warn(
                    f"backbone {name}: weights {bb.revision!r} differ from the {want!r} the model was "
                    "trained on; predictions may be off",
                    stacklevel=2,
                )
        return cls(geo, bb)

    @property
    def gazetteer(self) -> Any:
        """The exact nearest-place gazetteer (KD-tree over rg_cities1000; built on first use, ~1 s)."""
        if self._gazetteer is None:
            self._gazetteer = Gazetteer.load(table=False)
        return self._gazetteer

    @property
    def takes_text(self) -> bool:
        return self.backbone is not None and self.backbone.kind == "text"

    # --- entry points -------------------------------------------------------------------------------
    def predict(
        self, inputs: Any, options: PredictOptions | None = None, *, progress: bool = False, **overrides: Any
    ) -> list[ItemPrediction]:
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
        with progress_bar(total, "predict", unit="item", enabled=progress) as bar:
            batch: list[Item | Failure] = []
            for rec in records:
                batch.append(rec)
                if len(batch) >= opts.batch_size:
                    yield from self._run_batch(batch, opts, bar.update)
                    batch = []
            if batch:
                yield from self._run_batch(batch, opts, bar.update)

    # --- internals ----------------------------------------------------------------------------------
    def _run_batch(
        self,
        batch: list[Item | Failure],
        opts: PredictOptions,
        advance: Callable[[int], Any] = lambda n: None,
    ) -> list[ItemPrediction]:
        """One backbone batch; ``advance(n)`` is called as items finish (``_MODEL_CHUNK`` at a time)."""
        bb = self.backbone
        results: list[ItemPrediction | None] = [None] * len(batch)
        good: list[int] = []
        prepared: list[Any] = []
        for i, rec in enumerate(batch):
            if isinstance(rec, Failure):
                results[i] = ItemPrediction(
                    id=rec.id, input=rec.source, kind="", query=rec.source, error=rec.reason
                )
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
        advance(len(batch) - len(good))
        if good:
            cond = bb.encode(bb.collate(prepared))
            for lo in range(0, len(good), _MODEL_CHUNK):
                part = good[lo : lo + _MODEL_CHUNK]
                recs = [batch[i] for i in part]
                answers = self._predict_cond(
                    cond[lo : lo + _MODEL_CHUNK],
                    opts,
                    [r.id for r in recs],
                    [r.source for r in recs],
                    [r.kind for r in recs],
                    [(r.lat, r.lon) for r in recs],
                    [_query(r) for r in recs],
                )
                for i, res in zip(part, answers, strict=True):
                    results[i] = res
                advance(len(part))
        return [r for r in results if r is not None]


def _query(rec: Item) -> str:
    """What was asked: the text of a text item (its id may be a manifest id or a slug), else the source."""
    return rec.payload if rec.kind == "text" and isinstance(rec.payload, str) else rec.source


def _failed(rec: Item, reason: str) -> ItemPrediction:
    return ItemPrediction(
        id=rec.id,
        input=rec.source,
        kind=rec.kind,
        query=_query(rec),
        error=reason,
        true_lat=rec.lat if math.isfinite(rec.lat) else None,
        true_lon=rec.lon if math.isfinite(rec.lon) else None,
    )


# ------------------------------------------------------------------------------------------ the job
def is_hybrid(checkpoint: str | Path) -> bool:
    """Whether ``checkpoint`` is a hybrid checkpoint (holds ``hybrid.json``)."""
    return (Path(checkpoint) / HYBRID_FILE).is_file()


def load_predictor(checkpoint: str | Path, **kwargs: Any) -> Predictor:
    """:meth:`Predictor.from_pretrained` after checking that ``checkpoint`` is a checkpoint directory (a
    flow's ``config.json`` or a hybrid's ``hybrid.json``)."""
    if not (is_hybrid(checkpoint) or (Path(checkpoint) / "config.json").is_file()):
        raise InputError(
            f"{checkpoint}: not a checkpoint directory (no config.json or {HYBRID_FILE}); "
            "pass --checkpoint DIR"
        )
    return Predictor.from_pretrained(checkpoint, **kwargs)


def _lines(stream: TextIO) -> list[str]:
    """Non-blank lines of a text stream, without their line ends (one entry per line)."""
    return [line.rstrip("\r\n") for line in stream if line.strip()]


def read_texts(
    texts: Sequence[str] = (), text_files: Sequence[str | Path] = (), stdin: TextIO | None = None
) -> list[str]:
    """``--text`` values and the lines of ``--text-file`` files → the texts to locate, in order.

    ``-`` (as a ``--text`` value or a file name) reads one text per line from ``stdin`` (default:
    ``sys.stdin``), once; blank lines are skipped. A missing or unreadable file is an :class:`InputError`,
    raised before any model loads.
    """
    out: list[str] = []
    used_stdin = False
    for source, value in [("text", t) for t in texts] + [("file", f) for f in text_files]:
        if str(value) == STDIN:
            if used_stdin:
                raise InputError("stdin ('-') can be read once; pass '-' a single time")
            used_stdin = True
            out += _lines(stdin or sys.stdin)
        elif source == "text":
            out.append(str(value))
        else:
            try:
                with open(value, encoding="utf-8") as f:
                    out += _lines(f)
            except OSError as e:
                raise InputError(f"--text-file {value}: cannot read it ({e.strerror or e})") from e
            except UnicodeDecodeError as e:
                raise InputError(f"--text-file {value}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return out


def check_outputs(
    out: str | Path | None = None, density_out: str | Path | None = None, geojson: str | Path | None = None
) -> None:
    """Reject output paths whose format is unknown before any work is done (a 2-hour run should not fail at
    the write): ``out`` .csv / .parquet, ``density_out`` .geojson / .json / .parquet; none may be a folder."""
    for path, suffixes, what in (
        (out, TABLE_SUFFIXES, "--out"),
        (density_out, DENSITY_SUFFIXES, "--density-out"),
        (geojson, None, "--geojson"),
    ):
        if path is None:
            continue
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{what} {p}: is a folder; give a file name")
        if suffixes is not None and p.suffix.lower() not in suffixes:
            raise ConfigError(
                f"{what} {p}: unknown format {p.suffix or '(no suffix)'}; use {' or '.join(suffixes)}"
            )


def collect_records(
    inputs: Sequence[str],
    texts: Sequence[str],
    takes_text: bool,
    split: Sequence[str] | None,
    root: Path | None,
    limit: int | None,
) -> tuple[list | Iterator, int | None]:
    """Positional inputs and texts → records (files, folders, or manifests by name or .toml path), and their
    number when known (manifests stream). An input ``-`` reads one entry per line from stdin: texts when the
    backbone embeds texts, image paths otherwise."""
    records: list = []
    inputs, texts = list(inputs), list(texts)
    if STDIN in inputs:  # one entry per line: texts for a text backbone, image paths otherwise
        if inputs.count(STDIN) > 1:
            raise InputError("stdin ('-') can be read once; pass '-' a single time")
        lines = _lines(sys.stdin)
        if takes_text:
            texts += lines
        else:
            inputs = [x for x in inputs if x != STDIN] + lines
    for x in inputs:
        if x == STDIN:
            continue
        p = Path(x)
        if p.suffix == ".toml" or not (p.exists() or p.suffix.lower() in IMAGE_SUFFIXES):
            manifest = load_manifest(x, root=root)
            records.append(iter_items(manifest, splits=split))
        else:
            records.append(collect_inputs([p], text=False))
    if texts:
        if not takes_text:
            raise InputError(
                "--text needs a checkpoint trained on a text backbone (e.g. minilm); this one "
                "embeds images: pass image files or folders instead"
            )
        records.append(collect_inputs(texts, text=True))
    if not records:
        raise InputError("nothing to predict: pass image files, folders, a manifest, or --text")
    stream = itertools.chain.from_iterable(records)
    sized = all(isinstance(r, list) for r in records)
    total = sum(len(r) for r in records) if sized else None
    if limit is not None:
        stream = itertools.islice(stream, limit)
        total = limit if total is None else min(total, limit)
    return list(stream) if sized or limit is not None else stream, total


def run_predict(
    predictor: Predictor,
    inputs: Sequence[str],
    texts: Sequence[str],
    options: PredictOptions,
    *,
    split: Sequence[str] | None = None,
    root: Path | None = None,
    limit: int | None = None,
    max_maps: int = MapOptions.max_maps,
    progress: bool = True,
) -> list[ItemPrediction]:
    """Predict for inputs/texts (see :func:`collect_records`); only the first ``max_maps`` located results
    keep their embedding and samples (the ones a map will be drawn for), so memory stays flat."""
    records, total = collect_records(list(inputs), list(texts), predictor.takes_text, split, root, limit)
    results = []
    kept = 0
    for r in predictor.predict_items(records, options, progress=progress, total=total):
        if r.ok and r.embedding is not None and kept < max_maps:
            kept += 1
        else:  # only the mapped items need their embedding and samples in memory
            r.embedding = r.samples = None
        results.append(r)
    return results


@dataclass(frozen=True)
class PredictSummary:
    """What a predict run did, for the log and the exit code.

    ``failures``: ``(item, reason)`` of every input that could not be used (item: its id, and its file when
    that differs). ``ok`` — the run's exit code is 0 — when nothing failed, or when some items were located
    and at most ``max_failure_rate`` of them failed (the rule of ``embed`` and ``store import``). A folder
    where 3 of 4 images are unreadable is a failed run, though the one good answer is still written.
    """

    total: int
    failures: tuple[tuple[str, str], ...]
    max_failure_rate: float

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def located(self) -> int:
        return self.total - self.failed

    @property
    def failure_rate(self) -> float:
        return self.failed / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 or (self.located > 0 and self.failure_rate <= self.max_failure_rate)

    def lines(self, limit: int = _FAILURE_LINES) -> list[str]:
        """The counts, then one line per failed item (the first ``limit``) naming it and the reason."""
        out = [f"{self.total} item(s), {self.located} located, {self.failed} failed"]
        out += [f"  failed {item}: {reason}" for item, reason in self.failures[:limit]]
        if self.failed > limit:
            out.append(
                f"  ... {self.failed - limit} more failed item(s); --out FILE lists each in its error column"
            )
        return out

    def verdict(self) -> str | None:
        """None for a run that succeeded; else the one line saying why the exit code is 1."""
        if self.ok:
            return None
        if self.located == 0:
            return f"no item could be located ({self.failed} failed)"
        return (
            f"{self.failed} of {self.total} items failed ({self.failure_rate:.2%}, above the "
            f"{self.max_failure_rate:.2%} of --max-failure-rate); the {self.located} located were written"
        )


def summarize(
    results: Sequence[ItemPrediction], max_failure_rate: float = PredictOptions.max_failure_rate
) -> PredictSummary:
    """Results of :func:`run_predict` → :class:`PredictSummary` (failed items in input order)."""
    failures = tuple(
        (r.id if r.input in ("", r.id) else f"{r.id} ({r.input})", r.error or "failed")
        for r in results
        if not r.ok
    )
    return PredictSummary(total=len(results), failures=failures, max_failure_rate=max_failure_rate)


def _slug(text: str, is_path: bool) -> str:
    """A file-name-safe short form of an id (a path's stem, or the text)."""
    base = Path(text).stem if is_path else text
    return re.sub(r"[^A-Za-z0-9_-]+", "_", base).strip("_")[:60] or "item"


def write_maps(
    predictor: EmbeddingPredictor,
    results: Sequence[ItemPrediction],
    directory: str | Path | None,
    *,
    max_maps: int = MapOptions.max_maps,
    formats: Sequence[str] = MapOptions().formats,
    steps: int = MapOptions.steps,
    levels: int = MapOptions.levels,
    start_resolution: int = MapOptions.start_resolution,
    trajectories: int = MapOptions.trajectories,
    seed: int | None = MapOptions.seed,
    progress: bool = False,
    chunk: int = MapOptions.chunk,
    density_out: str | Path | None = None,
    max_steps: int = DensityConfig.max_steps,
    flow_resolution: int | None = MapOptions.flow_resolution,
) -> list[Path]:
    """Density maps (``NNN-<id>.png`` / ``.html``) for the first ``max_maps`` located results.

    ``directory=None`` draws no pictures; ``density_out`` (``.parquet`` or ``.geojson``) also writes the
    cells of every map to one file (see :func:`write_density_cells`). Returns the paths written.

    The results must carry their embeddings (``PredictOptions(keep_embeddings=True)``); their samples, if
    kept, seed the refinement. ``steps``: RK4 steps of the likelihood ODE; ``levels``: H3 refinement levels
    (see :class:`geoloc.config.DensityConfig`). ``trajectories``: overlay the denoising paths of that many
    samples per item (flow families). Items are mapped ``chunk`` at a time in one batched likelihood call.
    ``max_steps`` caps the likelihood steps a map whose mass is off by more than 1% is redrawn with.
    ``flow_resolution``: a hybrid's flow part on cells of that H3 resolution (see :class:`MapOptions`).
    """
    todo = [(i, r) for i, r in enumerate(results) if r.ok and r.embedding is not None][:max_maps]
    if not todo:
        return []
    geo = predictor.geolocator
    lik = replace(geo.likelihood_config, steps=steps)
    cfg = DensityConfig(start_resolution=start_resolution, levels=levels, likelihood=lik, max_steps=max_steps)
    if density_out is not None:
        check_outputs(density_out=density_out)
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
    cells: list[tuple[ItemPrediction, Any]] = []
    gen = torch.Generator(device=geo.device).manual_seed(seed) if seed is not None else None
    written: list[Path] = []
    with progress_bar(len(todo), "density maps", unit="map", enabled=progress) as bar:
        for lo in range(0, len(todo), chunk):
            part = todo[lo : lo + chunk]
            cond = torch.as_tensor(np.stack([r.embedding for _, r in part]), dtype=torch.float32)
            seeds = None
            if all(r.samples is not None for _, r in part):
                seeds = torch.as_tensor(np.stack([r.samples for _, r in part]), dtype=torch.float32)
            bound = bind_batch(geo, cond, flow_resolution)  # a hybrid searches its neighbours once per chunk
            dmaps = density_maps(bound, cond, cfg, seeds=seeds, generator=gen)
            paths = None
            if trajectories > 0:
                traj: list[Any] = []
                bound.sample(cond, trajectories, omega=0.0, generator=gen, trajectory=traj)
                if traj:  # (B·n, T, 3) states from noise to data → (B, n, T, 2) lat/lon
                    states = torch.cat(traj, dim=0)
                    paths = (
                        xyz_to_latlon(states.double()).reshape(len(part), trajectories, -1, 2).cpu().numpy()
                    )
            for j, ((i, r), dmap) in enumerate(zip(part, dmaps, strict=True)):
                if density_out is not None:
                    cells.append((r, dmap))
                if directory is None:
                    continue
                stem = f"{i:03d}-{_slug(r.id, r.kind == 'image' and r.id == r.input)}"
                title = map_title(r.id, r.query or r.input, r.localizability_bits)
                modes = [
                    {"lat": m.lat, "lon": m.lon, "mass": m.mass, "label": m.place.label if m.place else None}
                    for m in r.modes
                ] or None
                truth = (r.true_lat, r.true_lon) if r.true_lat is not None else None
                if "png" in formats:
                    written.append(
                        render_png(
                            dmap,
                            directory / f"{stem}.png",
                            title=title,
                            truth=truth,
                            modes=modes,
                            estimate=(r.lat, r.lon),
                            trajectories=None if paths is None else paths[j],
                            localizability_bits=r.localizability_bits,
                        )
                    )
                if "html" in formats:
                    written.append(
                        render_html(
                            dmap,
                            directory / f"{stem}.html",
                            title=title,
                            truth=truth,
                            modes=modes,
                            estimate=(r.lat, r.lon),
                            localizability_bits=r.localizability_bits,
                        )
                    )
            bar.update(len(part))
    if density_out is not None:
        written.append(write_density_cells(cells, density_out))
    return written


def write_density_cells(maps: Sequence[tuple[ItemPrediction, Any]], path: str | Path) -> Path:
    """The cells of several items' density maps in one file, each row / feature tagged with its item.

    ``.parquet``: :func:`geoloc.export.density_rows` columns after ``item_id`` and ``query``; ``.geojson``
    / ``.json``: :func:`geoloc.export.density_features` polygons with ``item_id`` and ``query`` properties
    (for one item, the same content as :func:`geoloc.export.write_density` plus those tags). Atomic write.
    """
    path = Path(path)
    check_outputs(density_out=path)
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa  # heavy optional dependency: only when a Parquet file is asked for
        import pyarrow.parquet as pq

        tables = []
        for r, dmap in maps:
            cols = density_rows(dmap)
            n = len(cols["cell"])
            tables.append(pa.table({"item_id": [r.id] * n, "query": [r.query or r.input] * n, **cols}))
        table = pa.concat_tables(tables) if tables else pa.table({"item_id": pa.array([], pa.string())})
        return atomic_write(path, lambda p: pq.write_table(table, p))
    features = []
    for r, dmap in maps:
        for f in density_features(dmap)["features"]:
            f["properties"] = {"item_id": r.id, "query": r.query or r.input, **f["properties"]}
            features.append(f)
    body = json.dumps(
        {"type": "FeatureCollection", "features": features}, ensure_ascii=False, separators=(",", ":")
    )
    return atomic_write(path, lambda p: Path(p).write_text(body, encoding="utf-8"))
