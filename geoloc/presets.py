"""Named training configurations: the paper's runs (docs/reference-behaviour.md §11) and a ``small`` one for a
2-core CPU.

Names are ``<dataset>-<family>`` for the paper (``osv5m-rfm-s2``, ``yfcc-flow-r3``, ``inat21-vmf-mix``, ...,
plus ``yfcc-rfm-s2-10m``: the "RFM₁₀M" row is 10M *iterations*) and ``small-<family>``; ``small`` is
``small-rfm-s2``. Each preset states only what differs from its base.

Paper recipe: width 512 (256 for iNat21), depth 12, LAMB lr 8e-4, weight decay 0.05 (0.1 for iNat21), 500
warm-up steps then cosine to 0 at 1M steps, batch 1024 (512 for iNat21), condition dropout 0.1, sigmoid
schedule (−7, 3, 1). vMF baselines: depth 11, lr 1e-4 (mixture on YFCC/iNat21: 1e-5), gradient clipping
0.05 / 0.01, no guidance. # reference differs: our EMA really averages (docs/reference-behaviour.md §16.1),
and weight decay skips biases and norms (docs/reference-behaviour.md §16.16).
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from geoloc.config import (
    DataConfig,
    FamilyConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    use_family,
)
from geoloc.errors import ConfigError
from geoloc.suggest import did_you_mean

__all__ = ["PRESETS", "get_preset", "resolve_config"]

_FAMILIES = ("rfm-s2", "flow-r3", "diffusion-r3", "vmf", "vmf-mix")

_PAPER = TrainConfig(
    model=ModelConfig(dim=512, depth=12, expansion=4),
    optim=OptimConfig(name="lamb", lr=8e-4, weight_decay=0.05, warmup_steps=500, ema_decay=0.999),
    data=DataConfig(batch_size=1024),
    steps=1_000_000,
    eval_every=25_000,
    ckpt_every=5_000,
)

# vMF learning rate and clipping per dataset (docs/reference-behaviour.md §11.1).
_VMF = {
    "osv5m": {"vmf": (1e-4, 0.05), "vmf-mix": (1e-4, 0.05)},
    "yfcc": {"vmf": (1e-4, 0.05), "vmf-mix": (1e-5, 0.01)},
    "inat21": {"vmf": (1e-4, 0.01), "vmf-mix": (1e-5, 0.01)},
}


def _paper(dataset: str, family: str) -> TrainConfig:
    cfg = _PAPER
    if dataset == "inat21":
        cfg = replace(
            cfg,
            model=replace(cfg.model, dim=256),
            optim=replace(cfg.optim, weight_decay=0.1),
            data=replace(cfg.data, batch_size=512),
        )
    if family.startswith("vmf"):
        lr, clip = _VMF[dataset][family]
        return replace(
            cfg,
            model=replace(cfg.model, depth=11),
            family=use_family(FamilyConfig(), family),
            optim=replace(cfg.optim, lr=lr, grad_clip=clip),
        )
    return replace(cfg, family=use_family(FamilyConfig(), family))


_SMALL = TrainConfig(
    model=ModelConfig(dim=256, depth=4, expansion=4),
    optim=OptimConfig(
        name="adamw", lr=1e-3, weight_decay=0.01, warmup_steps=100, ema_decay=0.995, grad_clip=1.0
    ),
    data=DataConfig(batch_size=512),
    steps=3000,
    log_every=25,
    eval_every=500,
    ckpt_every=500,
    val_samples=1024,
)


def _small(family: str) -> TrainConfig:
    return replace(_SMALL, family=use_family(FamilyConfig(), family))


PRESETS: dict[str, TrainConfig] = {}
for _ds in ("osv5m", "yfcc", "inat21"):
    for _fam in _FAMILIES:
        PRESETS[f"{_ds}-{_fam}"] = _paper(_ds, _fam)
PRESETS["yfcc-rfm-s2-10m"] = replace(PRESETS["yfcc-rfm-s2"], steps=10_000_000)
for _fam in _FAMILIES:
    PRESETS[f"small-{_fam}"] = _small(_fam)
PRESETS["small"] = PRESETS["small-rfm-s2"]


def get_preset(name: str) -> TrainConfig:
    """The preset called ``name`` (ConfigError listing the choices otherwise)."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; "
            f"choose one of: {', '.join(sorted(PRESETS))}"
        )
    return PRESETS[name]


def resolve_config(
    preset: str | None = None,
    toml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    family: str | None = None,
) -> TrainConfig:
    """Preset → TOML file (same dotted keys, as tables) → ``key=value`` overrides → ``family``, in that order.

    ``family`` switches the family last through :func:`geoloc.config.use_family` (so ``--family vmf`` also
    turns condition dropout off).
    """
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
    cfg = apply_overrides(cfg, parsed)
    if family is not None:
        cfg = replace(cfg, family=use_family(cfg.family, family))
    return cfg
