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
