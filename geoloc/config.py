"""Every knob of geoloc as frozen dataclasses, and the one function that applies overrides to them.

Each default lives once, here: training (:class:`TrainConfig` and its parts), density maps, feature-store
imports, embedding, prediction and the demo. Choices are ``Literal`` fields, so the CLI reads its choice
lists from here too. Torch-free on purpose: ``geoloc --help`` imports this module.

Presets (``presets.py``) are values of :class:`TrainConfig` built with ``dataclasses.replace``;
:func:`apply_overrides` applies dotted ``key=value`` overrides with type checks and "did you mean"
suggestions, so a typo is an error and never a silently ignored key. ``presets.resolve_config`` layers a
preset, a TOML file and overrides (it lives there so that config never imports presets: no cycle).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from geoloc.errors import ConfigError
from geoloc.suggest import did_you_mean

__all__ = [
    "DEMO_NAMES",
    "DataConfig",
    "DemoConfig",
    "DensityConfig",
    "EmbedConfig",
    "FamilyConfig",
    "ImportConfig",
    "LikelihoodConfig",
    "MapOptions",
    "ModelConfig",
    "OptimConfig",
    "PredictOptions",
    "SampleConfig",
    "TrainConfig",
    "apply_overrides",
    "choices",
    "config_from_dict",
    "config_to_dict",
    "use_family",
]


@dataclass(frozen=True)
class ModelConfig:
    """Network width, depth and MLP expansion (docs/reference-behaviour.md §4.3: 512 / 12 / 4 for OSV-5M and
    YFCC)."""

    dim: int = 512
    depth: int = 12
    expansion: int = 4


@dataclass(frozen=True)
class FamilyConfig:
    """Which generative family, and its path schedule.

    ``name``: ``rfm-s2`` | ``flow-r3`` | ``diffusion-r3`` | ``vmf`` | ``vmf-mix`` | ``uniform``.
    ``schedule``: ``sigmoid`` (default start −7, end 3, τ 1: every PLONK experiment) | ``linear`` |
    ``cosine``; ``schedule_params`` overrides its parameters.
    ``cond_drop``: probability of replacing the condition by the null (zero) token in training, for guidance.
    ``components``: number of vMF mixture components (``vmf-mix``).
    """

    name: str = "rfm-s2"
    schedule: str = "sigmoid"
    schedule_params: dict = field(default_factory=dict)
    cond_drop: float = 0.1
    components: int = 3


@dataclass(frozen=True)
class SampleConfig:
    """How to draw samples.

    ``steps``: solver steps, uniform in t (the paper: 250). ``method``: ``euler`` (the paper; for diffusion
    this is DDIM), ``heun``, ``midpoint`` or ``rk4`` (flow families), ``ddim`` (diffusion). ``omega``:
    guidance weight ω in (1+ω)·cond − ω·uncond (the paper predicts with ω = 2, draws distributions with
    ω = 0).
    ``retraction``: on S², ``exp`` (exponential map) or ``project`` (the reference's ambient step +
    normalise).
    ``batch_size``: max points integrated at once (memory bound).
    """

    steps: int = 250
    method: str = "euler"
    omega: float = 0.0
    retraction: str = "exp"
    batch_size: int = 65536


@dataclass(frozen=True)
class LikelihoodConfig:
    """How to integrate the change-of-variables ODE for exact log-densities.

    ``method``: ``dopri5`` (adaptive, torchdiffeq; ``rtol``/``atol``) or a fixed-step solver (``rk4``,
    ``heun``, ``midpoint``, ``euler``) with ``steps`` steps uniform in t. ``omega``: guidance (0 = the model's
    density).
    """

    method: str = "rk4"
    steps: int = 32
    rtol: float = 1e-5
    atol: float = 1e-5
    omega: float = 0.0
    batch_size: int = 4096  # the likelihood keeps a graph per point: ~0.4 MB per row at the paper's size


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule (docs/reference-behaviour.md §11: LAMB, lr 8e-4, wd 0.05, 500 warm-up steps,
    cosine to 0)."""

    name: Literal["adamw", "lamb"] = "adamw"
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    warmup_steps: int = 500
    grad_clip: float = 0.0
    ema_decay: float = 0.999


@dataclass(frozen=True)
class DataConfig:
    """Where training pairs come from: one or more feature stores (``PATH`` or ``PATH:WEIGHT``)."""

    stores: tuple[str, ...] = ()
    split: str = "train"
    val_split: str = ""
    where: str = ""
    batch_size: int = 1024
    shuffle_buffer: int = 65536
    partitions: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    family: FamilyConfig = field(default_factory=FamilyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1_000_000
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    log_every: int = 50
    eval_every: int = 1000
    ckpt_every: int = 1000
    val_samples: int = 2048


def use_family(family: FamilyConfig, name: str) -> FamilyConfig:
    """``family`` switched to the family ``name``: the one home of the rule that vMF families train without
    condition dropout (they are never guided, so dropping the condition only wastes signal;
    docs/reference-behaviour.md §11.1). Other families keep ``family.cond_drop``."""
    return dataclasses.replace(
        family, name=name, cond_drop=0.0 if name.startswith("vmf") else family.cond_drop
    )


# ------------------------------------------------------------------------------------- density maps
H3_MAX_RESOLUTION = 15


@dataclass(frozen=True)
class DensityConfig:
    """How finely to resolve a density map (see :mod:`geoloc.density` for the rules).

    ``start_resolution``: H3 resolution of the first, global grid (0: 122 cells, 1: 842, 2: 5,882).
    ``levels``: refinement levels after it (the finest cells are ``start_resolution + levels``; resolution 6
    cells are ~7 km across). ``tolerance``: at each level, refine the cells with the largest estimated
    quadrature errors until the errors left add up to at most this fraction of the mass.
    ``guard``: nats; neighbours of a refined cell that are at most this much less dense are refined too.
    ``max_refine``: at most this many cells refined per item and level (the largest errors first).
    ``seed_samples``: model draws per item whose cells are always candidates (0: none; ignored when seeds
    are passed in). ``likelihood``: the ODE settings (None: the geolocator's own). ``mass_tolerance``: a map
    whose Σ p·area is further than this from 1 is recomputed with twice the ODE steps, up to ``max_steps``
    (fixed-step solvers of ODE families only).
    """

    start_resolution: int = 1
    levels: int = 5
    tolerance: float = 0.01
    guard: float = 3.0
    max_refine: int = 256
    seed_samples: int = 64
    likelihood: LikelihoodConfig | None = None
    mass_tolerance: float = 0.01
    max_steps: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.start_resolution <= H3_MAX_RESOLUTION:
            raise ConfigError(f"start_resolution must be in 0..15, got {self.start_resolution}")
        if self.levels < 0 or self.start_resolution + self.levels > H3_MAX_RESOLUTION:
            raise ConfigError(f"levels must be >= 0 with start_resolution + levels <= 15, got {self.levels}")
        if min(self.tolerance, self.guard, self.max_refine, self.seed_samples, self.mass_tolerance) < 0:
            raise ConfigError("tolerance, guard, max_refine, seed_samples and mass_tolerance must be >= 0")


# ------------------------------------------------------------------------------------- feature stores
SourceKind = Literal["auto", "wds", "parquet", "numpy"]


@dataclass(frozen=True)
class ImportConfig:
    """One import of precomputed embeddings. Column options name Parquet/CSV columns or JSON keys; ``None``
    means auto-detect.

    Attributes:
        source: a file, a directory or a glob (``shards/*.tar``, ``feats/*.parquet``, ``emb.npy``).
        store: the feature store directory (created if missing).
        backbone: backbone name recorded in (or checked against) the store.
        split: split for every row; ``None`` uses the source's ``split`` column/key, else ``"train"``.
        emb_col: Parquet embedding column (fixed-size list or list), or a glob such as ``emb_*`` for one
            column per dimension (ordered by the number in the name).
        emb_key: the webdataset member extension that holds the embedding (``street_clip.npy``).
        metadata: the CSV/Parquet that pairs with an ``.npy`` (default: same stem next to it).
        labels: extra label columns/keys to keep besides every ``unique_*`` one.
        chunk_rows: rows per processing chunk; shard_rows: target rows per written shard.
        max_failure_rate: above this fraction of failed rows the import "fails" (the CLI exits 1); good
            rows are stored either way.
    """

    source: str
    store: str | os.PathLike
    backbone: str
    revision: str = ""
    split: str | None = None
    kind: SourceKind = "auto"
    id_col: str | None = None
    lat_col: str | None = None
    lon_col: str | None = None
    emb_col: str | None = None
    emb_key: str = "street_clip.npy"
    metadata: str | os.PathLike | None = None
    labels: tuple[str, ...] = ()
    chunk_rows: int = 8_192
    shard_rows: int = 32_768
    max_failure_rate: float = 0.05
    task: str | None = None
    progress: bool = True
    wait_s: float = 0.0  # another writer holds the store: wait this long for it (0 = exit with one line)


EmbedDtype = Literal["auto", "fp32", "bf16"]
EngineName = Literal["local", "ray"]


@dataclass(frozen=True)
class EmbedConfig:
    """Everything ``geoloc embed`` can be told; CLI flags mirror these fields.

    Attributes:
        manifest: dataset manifest (a ``.toml`` path or a shipped name such as ``demo-geonames``).
        store: feature-store directory (created, or grown if it exists).
        root: dataset root, overriding the manifest's ``root``.
        splits: splits to embed (None = all).
        backbone: registry name or ``open_clip:ARCH/TAG``; None = the store's backbone if the store exists,
            else ``minilm`` for text datasets and ``dinov2-l-reg`` for images.
        weights: local weights (file or directory) instead of the offline Hugging Face cache.
        backbone_config: architecture override with random weights (tests and benchmarks only).
        batch_size: items per model batch.
        num_workers: decode/preprocess worker processes (None = min(4, CPU count) for images, 0 for text;
            0 = in-process).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: ``auto`` (bf16 where the device supports it), ``fp32`` or ``bf16``.
        shard_size: rows per shard file.
        flush_interval_s: also write a (smaller) shard when this much time passed since the last one, so a
            kill loses little on slow backbones.
        limit: embed a deterministic subsample of this many dataset rows (the manifest's ``limit``).
        engine: ``local`` or ``ray``.
        max_failure_rate: the run counts as failed (non-zero exit) above this fraction of failed items.
        progress: show a progress bar.
        replicas, ray_address: ray engine only (model replicas; cluster address).
    """

    manifest: str | Path
    store: str | Path
    root: str | Path | None = None
    splits: tuple[str, ...] | None = None
    backbone: str | None = None
    weights: str | Path | None = None
    backbone_config: Any = None
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    dtype: EmbedDtype = "auto"
    shard_size: int = 50_000
    flush_interval_s: float = 300.0
    limit: int | None = None
    engine: EngineName = "local"
    max_failure_rate: float = 0.05
    progress: bool = True
    replicas: int | None = None
    ray_address: str | None = None
    wait_s: float = 0.0  # another writer holds the store: wait this long for it (0 = exit with one line)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ConfigError(f"max_failure_rate must be in [0, 1], got {self.max_failure_rate}")
        if self.flush_interval_s <= 0:
            raise ConfigError(f"flush_interval_s must be > 0, got {self.flush_interval_s}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.engine not in typing.get_args(EngineName):
            raise ConfigError(
                f"unknown engine {self.engine!r}; choose one of {sorted(typing.get_args(EngineName))}"
            )
        if self.dtype not in typing.get_args(EmbedDtype):
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose auto, fp32 or bf16")


# ------------------------------------------------------------------------------------- prediction
EstimatorName = Literal["sample", "median", "geoscore", "mode", "mean", "best-of-n"]
MapFormat = Literal["png", "html", "both"]
PredictFormat = Literal["table", "json", "jsonl"]
"""How ``geoloc predict`` prints its answers on stdout (the first value is the default): a table, one JSON
list, or one JSON object per line."""


@dataclass(frozen=True)
class PredictOptions:
    """What to compute per item.

    ``estimator``: ``geoscore`` (default: the answer maximising the expected GeoScore under the model, for a
    hybrid over its draws ∪ its neighbours — the best answer it can give), ``sample`` (one guided draw,
    ω = 2: the paper's protocol, which stays ``geoloc eval``'s default for comparability; vMF: the mean
    direction), ``median``, ``mode``, ``mean`` or ``best-of-n`` (see ``geoloc.estimators``). ``top_k``:
    distinct locations to report (0: none). ``samples``: model draws behind the top-k and the sample-based
    estimators. ``omega``: guidance for the estimator (None: the estimator's default). ``localizability``:
    also estimate E_p[log₂ p] from ``localizability_samples`` exact likelihoods (costly: an ODE per sample).
    ``regions``: the area in km² of the highest-density regions holding ``region_levels`` of the mass, by
    importance sampling over ``region_samples`` exact draws and their exact log-densities (an ODE per draw
    for flows; relative noise ≈ √(CV²/n), a few % to ~15%; S² densities only). With localizability too,
    both use one set of max(``region_samples``, ``localizability_samples``) draws. ``steps``: sampler steps
    (None: the checkpoint's, 250 as in the paper). The default 32 is the fewest Euler steps whose answer
    scored within noise of 250 steps' on bench/bench_nfe.py's known-density task (16 lost 1.8 %),
    at 7-8x the speed; ``geoloc eval`` keeps 250 (the paper's protocol). ``batch_size``: inputs per backbone
    batch. ``seed``: makes the draws reproducible. ``places``: look up the nearest GeoNames place of the
    estimate and of each mode. ``keep_embeddings`` / ``keep_samples``: keep them on each result (for density
    maps). ``max_failure_rate``: a run over many inputs counts as failed (``geoloc predict`` exits 1) when
    more than this fraction of them could not be used, as for ``embed`` and ``store import``; every good
    prediction is written either way.
    """

    estimator: EstimatorName = "geoscore"
    top_k: int = 3
    samples: int = 256
    omega: float | None = None
    localizability: bool = False
    localizability_samples: int = 256
    regions: bool = True
    region_samples: int = 128
    region_levels: tuple[float, ...] = (0.5, 0.9)
    steps: int | None = 32  # reference differs: 250 (see the docstring; bench/bench_nfe.py)
    batch_size: int = 32
    seed: int | None = 0
    places: bool = True
    keep_embeddings: bool = False
    keep_samples: bool = False
    max_failure_rate: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ConfigError(f"max_failure_rate must be in [0, 1], got {self.max_failure_rate}")


@dataclass(frozen=True)
class MapOptions:
    """Density maps written by ``geoloc predict --maps``: at most ``max_maps`` items, as ``format``.

    ``steps``: RK4 steps of the likelihood ODE; ``levels`` / ``start_resolution``: the H3 grid (see
    :class:`DensityConfig`); ``trajectories``: overlay the denoising paths of that many samples per item
    (flow families); ``chunk``: items mapped together in one batched likelihood call. ``flow_resolution``:
    a hybrid's flow part is evaluated once per H3 cell of this resolution and held constant inside it (its
    kernels stay exact at every cell; None: the flow at every cell), see
    :meth:`geoloc.hybrid_bound.BoundHybrid._flow_on_cells`.
    """

    max_maps: int = 10
    format: MapFormat = "png"
    steps: int = 16
    levels: int = 5
    start_resolution: int = 1
    trajectories: int = 0
    seed: int | None = 0
    chunk: int = 4
    flow_resolution: int | None = 3

    @property
    def formats(self) -> tuple[str, ...]:
        """The file kinds to write: ``("png",)``, ``("html",)`` or both."""
        return ("png", "html") if self.format == "both" else (self.format,)


# ------------------------------------------------------------------------------------- checkpoint conversion
PlonkFamily = Literal["rfm-s2", "flow-r3", "diffusion-r3"]
"""Families a published PLONK checkpoint can be (``geoloc convert plonk --family``)."""
PlonkWeights = Literal["ema", "raw"]
"""Which weights of a Lightning ``.ckpt`` to convert: the EMA ones (published; the first value is the
default) or the raw ones."""


# ------------------------------------------------------------------------------------- the demo
DEMO_NAMES: tuple[tuple[str, str], ...] = (
    ("Springfield", "ambiguous"),
    ("Paris", "ambiguous"),
    ("San Jose", "ambiguous"),
    ("Reykjavik", "unambiguous"),
    ("Ouagadougou", "unambiguous"),
    ("Vladivostok", "unambiguous"),
)


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo (``geoloc demo``); the defaults fit ``just demo`` in 10 minutes on a quiet 2-core CPU
    without native bf16, set-up included (README, issue 12).

    ``limit`` names are embedded; the flow (``steps``) and the vMF (``vmf_steps``) train on the train split
    minus the validation slice ``val_where`` (SQL on the store's ids), on which the hybrid is fitted
    (``val_items`` of them); the table evaluates the held-out test split (``eval_where`` narrows it) with
    ``seeds``; every sampler runs ``eval_steps`` steps (the paper-protocol row: one guided draw; the
    sample-based answers: ``answer_n`` draws; the hybrid's answer fit: ``answer_n`` draws of
    ``answer_steps``); calibration uses ``calibration_n`` exact draws per item on about ``calibration_items``
    test items (its cost is ``calibration_n`` likelihood solves per item). The hybrid's density is fitted on
    ``val_items`` validation names (a likelihood solve each) and its answer on up to ``answer_items`` (flow
    draws only; the settings it compares differ by a few GeoScore points, so it takes every name of the slice
    it can; its draws take ``answer_steps`` = 8 Euler steps, recorded in the hybrid so that its answers draw
    the same: on the demo's 2,756 validation names the fitted answer scored 2,411 GeoScore on 8-step draws
    against 2,407 on 16-step ones, at half the cost — 14 s against 30 s). Showcase: the ``n_extreme`` most and
    least localizable of ``showcase_pool`` test names sampled by id hash (by the hybrid's localizability from
    ``showcase_draws`` exact draws each: a likelihood solve per draw, and the extremes of 100 names stand out
    at 16), then ``names``; density maps of the hybrid for the first ``max_maps`` names, their flow part
    solved with ``map_steps`` RK4 steps (12: every demo map within 0.2 % of mass 1 in one pass, where 8 steps
    left Paris 2 % off and redrew it at 16 — 47 s against 51 s for the three maps).
    """

    out_dir: Path = Path("demo_out")
    limit: int = 30_000
    steps: int = 1200
    vmf_steps: int = 300
    seeds: tuple[int, ...] = (0,)
    names: tuple[tuple[str, str], ...] = DEMO_NAMES
    maps: bool = True
    max_maps: int = 3
    map_steps: int = 12
    progress: bool = True
    val_where: str = "id LIKE '%7'"
    val_items: int = 1000
    answer_items: int = 3000
    eval_where: str | None = None
    eval_steps: int = 16
    answer_n: int = 16
    answer_steps: int = 8
    calibration_n: int = 32
    calibration_items: int = 150
    showcase_pool: int = 100
    showcase_draws: int = 16
    n_extreme: int = 2


# ------------------------------------------------------------------------------------- helpers
def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal[...]`` alias (or of a dataclass field annotated with one)."""
    return tuple(typing.get_args(literal))


def config_to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (str from the CLI is parsed)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from e
    if origin is tuple or tp is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(tp)
        inner = args[0] if args else str
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, inner, key) for v in items if v != "")
        if args and len(args) != len(items):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args or [str] * len(items), strict=True))
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: expected a JSON object, got {value!r}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table/dict, got {value!r}")
        return dict(value)
    return value


def _replace_path(cfg: Any, path: list[str], value: Any, full_key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    name = path[0]
    if name not in fields:
        prefix = full_key.split(".")[: -len(path)]
        # config keys are quoted with backticks in messages (they are typed as `--set key=value`)
        hint = did_you_mean(".".join([*prefix, name]), [".".join([*prefix, f]) for f in fields]).replace(
            "'", "`"
        )
        raise ConfigError(f"unknown config key `{full_key}`{hint}")
    hints = typing.get_type_hints(type(cfg))
    current = getattr(cfg, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"unknown config key `{full_key}`: `{name}` has no sub-keys")
        return dataclasses.replace(cfg, **{name: _replace_path(current, path[1:], value, full_key)})
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"`{full_key}` is a section; set its keys, e.g. `{full_key}.<key>=...`")
        for k, v in value.items():
            current = _replace_path(current, [k], v, f"{full_key}.{k}")
        return dataclasses.replace(cfg, **{name: current})
    return dataclasses.replace(cfg, **{name: _coerce(value, hints[name], full_key)})


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return ``cfg`` with dotted-key overrides applied (``{"optim.lr": "3e-4"}``), type-checked."""
    for key, value in overrides.items():
        cfg = _replace_path(cfg, key.split("."), value, key)
    return cfg


def config_from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from :func:`config_to_dict` output (unknown keys are errors)."""
    return apply_overrides(cls(), {k: v for k, v in data.items()}) if data else cls()


# ------------------------------------------------------------------------------------------------------------
# Evaluation (`geoloc eval`): the one home of its defaults and choice lists
# ------------------------------------------------------------------------------------------------------------

Estimator = Literal["sample", "median", "geoscore", "mode", "best-of-n", "mean"]
Baseline = Literal["uniform", "retrieval", "retrieval-weighted"]
LabelMode = Literal["auto", "none", "latlon"]
RetrievalIndex = Literal["flat", "hnsw"]
TableLayout = Literal["auto", "osv5m", "yfcc4k", "full"]
Compat = Literal["fixed", "plonk"]

# The choice lists the CLI offers and the checks below use, read off the Literal types (one spelling each).
ESTIMATOR_CHOICES: tuple[str, ...] = typing.get_args(Estimator)
BASELINES: tuple[str, ...] = typing.get_args(Baseline)
LABEL_MODES: tuple[str, ...] = typing.get_args(LabelMode)
RETRIEVAL_INDEXES: tuple[str, ...] = typing.get_args(RetrievalIndex)
TABLE_LAYOUTS: tuple[str, ...] = typing.get_args(TableLayout)
COMPAT_MODES: tuple[str, ...] = typing.get_args(Compat)

EVAL_SPLIT = "test"
"""The split ``geoloc eval`` scores unless told otherwise (a run option, not part of the recorded config)."""

EVAL_CLI_DEVICE = "auto"
"""``geoloc eval --device`` default: a person at a terminal wants the GPU when there is one; library calls
keep :attr:`EvalConfig.device` (``cpu``) so a script's numbers do not depend on the machine."""


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate. Defaults are the published protocol (docs/eval-protocol.md §7).

    Prediction: ``estimator`` (``sample`` = one guided draw, the paper's Table 1; ``median``, ``geoscore``,
    ``mode``, ``best-of-n``, ``mean`` from ``n`` draws, see ``estimators.py``), ``omega`` (None: 2 for
    ``sample``, 0 otherwise), ``steps``/``method`` of the sampler, one prediction set per seed in ``seeds``.
    Data: ``batch_size`` items per step, ``where`` (SQL filter on the split), ``drop_tail`` (> 0: score only
    the first ⌊N/drop_tail⌋·drop_tail items, PLONK's single-device loader, quirk E; 0 scores every item).
    Labels: ``labels`` is ``"auto"`` (OSV-5M's ``unique_<level>`` columns when the store has them),
    ``"none"``, ``"latlon"`` (ground-truth keys from the true coordinates by the same nearest-place rule), or
    a mapping level → column name. ``compat``: ``fixed`` (every item counts, a failure is a miss) or
    ``plonk`` (the reference's quirks, see ``metrics.py``).
    Extras: NLL of the true location (``nll``, integrated with ``likelihood``, ω = 0 by default), the
    localizability from ``localizability_n`` exact samples (costly, off by default), PRDC with ``prdc_k``
    neighbours over ``prdc_chunks`` chunks and unchunked. Retrieval reads ``retrieval_split`` into a faiss
    ``retrieval_index`` (``flat`` exact inner product, or ``hnsw`` for big stores).
    ``device``: where models run (``auto``: CUDA when available; the command's default is
    :data:`EVAL_CLI_DEVICE`).
    ``gazetteer_cache``: folder of the cached H3 label table (default ``~/.cache/geoloc``); without a
    cached table labels come from the exact KD-tree (same labels, slower on millions of points).
    ``estimators``: several point estimates of each model in one run (one row each, named
    ``model[estimator]``); empty: ``estimator`` alone. ``calibration``: per row, the HDR level of each truth
    from ``calibration_n`` exact samples and their exact log-densities, reported as the coverage of the 50 /
    90 / 95 % regions and a calibration error (off by default: it costs ``calibration_n`` likelihoods per
    item; ``calibration_items`` > 0 limits it to about that many items, a uniform sample by id hash when the
    number of items is known, else the first that many of the pass; 0: every item).
    ``retrieval_k`` / ``retrieval_tau``: the ``retrieval-weighted`` row's neighbours and temperature
    (None: from a hybrid checkpoint's validation fit in the same run, else chosen by GeoScore on
    ``retrieval_val_items`` leave-one-out items of the retrieval split — never the evaluated split).
    """

    estimator: Estimator = "sample"
    estimators: tuple[Estimator, ...] = ()
    calibration: bool = False
    calibration_n: int = 64
    calibration_items: int = 0
    retrieval_k: int | None = None
    retrieval_tau: float | None = None
    retrieval_val_items: int = 3000
    n: int = 256
    omega: float | None = None
    steps: int = 250
    method: str = "euler"
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 4096
    where: str | None = None
    drop_tail: int = 0
    compat: Compat = "fixed"
    labels: LabelMode | typing.Mapping[str, str] = "auto"
    nll: bool = True
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    localizability: bool = False
    localizability_n: int = 64
    prdc: bool = True
    prdc_k: int = 3
    prdc_chunks: int = 20
    retrieval_split: str = "train"
    retrieval_index: RetrievalIndex = "flat"
    device: str = "cpu"
    table: TableLayout = "auto"
    gazetteer_cache: str | None = None

    def __post_init__(self) -> None:
        for est in (self.estimator, *self.estimators):
            if est not in ESTIMATOR_CHOICES:
                raise ConfigError(f"unknown estimator {est!r}; choose from {', '.join(ESTIMATOR_CHOICES)}")
        if len(set(self.estimators)) != len(self.estimators):
            raise ConfigError(f"estimators repeat: {list(self.estimators)}")
        if self.compat not in COMPAT_MODES:
            raise ConfigError(f"unknown compat mode {self.compat!r}; choose from {', '.join(COMPAT_MODES)}")
        if not self.seeds:
            raise ConfigError("give at least one seed (e.g. --seeds 0,1,2)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds repeat: {list(self.seeds)}; give distinct seeds")
        counts = ("n", "steps", "batch_size", "localizability_n", "prdc_k", "prdc_chunks", "calibration_n")
        for name in (*counts, "retrieval_val_items"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.drop_tail < 0:
            raise ConfigError(f"drop_tail must be ≥ 0 (0 scores every item), got {self.drop_tail}")
        if self.calibration_items < 0:
            raise ConfigError(f"calibration_items must be ≥ 0 (0: every item), got {self.calibration_items}")
        if (self.retrieval_k is not None and self.retrieval_k < 1) or (
            self.retrieval_tau is not None and not self.retrieval_tau > 0
        ):
            raise ConfigError(
                f"retrieval_k must be ≥ 1 and retrieval_tau > 0, got {self.retrieval_k}, {self.retrieval_tau}"
            )
        if isinstance(self.labels, str) and self.labels not in LABEL_MODES:
            raise ConfigError(
                f"labels must be one of {', '.join(LABEL_MODES)} or a LEVEL=COLUMN mapping, "
                f"got {self.labels!r}"
            )
        if self.retrieval_index not in RETRIEVAL_INDEXES:
            raise ConfigError(
                f"unknown retrieval index {self.retrieval_index!r}; "
                f"choose from {', '.join(RETRIEVAL_INDEXES)}"
            )
        if self.table not in TABLE_LAYOUTS:
            raise ConfigError(f"unknown table layout {self.table!r}; choose from {', '.join(TABLE_LAYOUTS)}")

    def effective_omega(self) -> float:
        """The guidance the point estimate uses: ``omega``, else 2 for ``sample`` and 0 for the others."""
        if self.omega is not None:
            return float(self.omega)
        return 2.0 if self.estimator == "sample" else 0.0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        d["labels"] = self.labels if isinstance(self.labels, str) else dict(self.labels)
        d["omega_effective"] = self.effective_omega()
        return d


# Kept next to the block it names, so that this block merges as one piece.
__all__ += [
    "BASELINES",
    "COMPAT_MODES",
    "ESTIMATOR_CHOICES",
    "EVAL_CLI_DEVICE",
    "EVAL_SPLIT",
    "LABEL_MODES",
    "RETRIEVAL_INDEXES",
    "TABLE_LAYOUTS",
    "Baseline",
    "Compat",
    "Estimator",
    "EvalConfig",
    "LabelMode",
    "RetrievalIndex",
    "TableLayout",
]


@dataclass(frozen=True)
class DistillConfig:
    """How to distil a guided ODE checkpoint into a one-pass student (``geoloc distill``, ``geoloc.distill``).

    ``omega``: the guidance the student reproduces (2: the paper's one guided draw). ``steps`` optimiser
    steps of ``batch_size`` (x, s, c) points at learning rate ``lr`` (linear warm-up over ``warmup_steps``,
    cosine to 0; AdamW without weight decay: the student starts at the teacher's weights and should stay
    near them). ``trajectory_fraction`` of each batch comes from the teacher's own guided trajectories with
    ``sampler_steps`` Euler steps (cycled), the rest from the training path's interpolants.
    ``val_points``: held-out points for the field error recorded before and after. ``seed``: noise,
    interpolation levels and trajectories. ``device``: where it runs (``auto``: CUDA when available).
    """

    omega: float = 2.0
    steps: int = 2000
    batch_size: int = 512
    lr: float = 5e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    trajectory_fraction: float = 0.5
    sampler_steps: tuple[int, ...] = (8, 16, 32)
    val_points: int = 2048
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_points"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.omega > 0:
            raise ConfigError(f"omega must be > 0 (ω = 0 is one pass already), got {self.omega}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"need lr > 0, warmup_steps ≥ 0, grad_clip ≥ 0; got {self.lr}, {self.warmup_steps}, "
                f"{self.grad_clip}"
            )
        if not 0.0 <= self.trajectory_fraction <= 1.0:
            raise ConfigError(f"trajectory_fraction must be in [0, 1], got {self.trajectory_fraction}")
        if not self.sampler_steps or min(self.sampler_steps) < 1:
            raise ConfigError(f"sampler_steps must be ≥ 1 each, got {list(self.sampler_steps)}")


__all__ += ["DistillConfig"]
