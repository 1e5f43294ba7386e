"""Every knob of geoloc as frozen dataclasses, and the one function that applies overrides to them.

Each default lives once, here. Presets (``presets.py``) are values of :class:`TrainConfig` built with
``dataclasses.replace``; ``resolve_config`` applies a TOML file and ``--set key=value`` overrides with type
checks and "did you mean" suggestions, so a typo is an error and never a silently ignored key.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from geoloc.errors import ConfigError

__all__ = [
    "DataConfig",
    "FamilyConfig",
    "LikelihoodConfig",
    "ModelConfig",
    "OptimConfig",
    "SampleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "resolve_config",
]


@dataclass(frozen=True)
class ModelConfig:
    """Network width, depth and MLP expansion (reference §4.3: 512 / 12 / 4 for OSV-5M and YFCC)."""

    dim: int = 512
    depth: int = 12
    expansion: int = 4


@dataclass(frozen=True)
class FamilyConfig:
    """Which generative family, and its path schedule.

    ``name``: ``rfm-s2`` | ``flow-r3`` | ``diffusion-r3`` | ``vmf`` | ``vmf-mix`` | ``uniform``.
    ``schedule``: ``sigmoid`` (default start −7, end 3, τ 1: every PLONK experiment) | ``linear`` | ``cosine``;
    ``schedule_params`` overrides its parameters.
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

    ``steps``: solver steps, uniform in t (the paper: 250). ``method``: ``euler`` (the paper; for diffusion this
    is DDIM), ``heun``, ``midpoint`` or ``rk4`` (flow families), ``ddim`` (diffusion). ``omega``: guidance weight
    ω in (1+ω)·cond − ω·uncond (the paper predicts with ω = 2, draws distributions with ω = 0).
    ``retraction``: on S², ``exp`` (exponential map) or ``project`` (the reference's ambient step + normalise).
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

    ``method``: ``dopri5`` (adaptive, torchdiffeq; ``rtol``/``atol``) or a fixed-step solver (``rk4``, ``heun``,
    ``midpoint``, ``euler``) with ``steps`` steps uniform in t. ``omega``: guidance (0 = the model's density).
    """

    method: str = "rk4"
    steps: int = 32
    rtol: float = 1e-5
    atol: float = 1e-5
    omega: float = 0.0
    batch_size: int = 4096  # the likelihood keeps a graph per point: ~0.4 MB per row at the paper's size


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule (reference §11: LAMB, lr 8e-4, wd 0.05, 500 warm-up steps, cosine to 0)."""

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
            import json

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
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" (did you mean `{'.'.join([*full_key.split('.')[:-len(path)], close[0]])}`?)" if close else ""
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


def resolve_config(
    preset: str | None = None, toml_path: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Preset → TOML file (same dotted keys, as tables) → ``key=value`` overrides, in that order."""
    from geoloc.presets import get_preset

    cfg = get_preset(preset) if preset else TrainConfig()
    if toml_path:
        try:
            data = tomllib.loads(Path(toml_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{toml_path}: cannot read config: {e}") from e
        cfg = apply_overrides(cfg, data)
    parsed: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
        k, v = item.split("=", 1)
        parsed[k.strip()] = v.strip()
    return apply_overrides(cfg, parsed)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (`geoloc eval`): the one home of its defaults and choice lists
# ---------------------------------------------------------------------------------------------------------------

Estimator = Literal["sample", "median", "geoscore", "mode", "best-of-n", "mean"]
Baseline = Literal["uniform", "retrieval"]
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
    """How to evaluate. Defaults are the published protocol (eval-protocol.md §7).

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
    """

    estimator: Estimator = "sample"
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
        if self.estimator not in ESTIMATOR_CHOICES:
            raise ConfigError(f"unknown estimator {self.estimator!r}; choose from {', '.join(ESTIMATOR_CHOICES)}")
        if self.compat not in COMPAT_MODES:
            raise ConfigError(f"unknown compat mode {self.compat!r}; choose from {', '.join(COMPAT_MODES)}")
        if not self.seeds:
            raise ConfigError("give at least one seed (e.g. --seeds 0,1,2)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds repeat: {list(self.seeds)}; give distinct seeds")
        for name in ("n", "steps", "batch_size", "localizability_n", "prdc_k", "prdc_chunks"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.drop_tail < 0:
            raise ConfigError(f"drop_tail must be ≥ 0 (0 scores every item), got {self.drop_tail}")
        if isinstance(self.labels, str) and self.labels not in LABEL_MODES:
            raise ConfigError(
                f"labels must be one of {', '.join(LABEL_MODES)} or a LEVEL=COLUMN mapping, got {self.labels!r}"
            )
        if self.retrieval_index not in RETRIEVAL_INDEXES:
            raise ConfigError(
                f"unknown retrieval index {self.retrieval_index!r}; choose from {', '.join(RETRIEVAL_INDEXES)}"
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
