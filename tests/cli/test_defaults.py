"""The CLI reads its defaults and choices from the config dataclasses: one home per default.

Each check compares a command's option (as Click sees it) with the dataclass field it mirrors, so a default
changed in ``geoloc/config.py`` shows in ``--help`` and in behaviour without touching ``geoloc/cli``.
"""

from __future__ import annotations

import dataclasses
import typing

import typer

from geoloc.cli import app
from geoloc.config import (
    DemoConfig,
    EmbedConfig,
    FamilyConfig,
    ImportConfig,
    MapOptions,
    PredictOptions,
    TrainConfig,
    use_family,
)
from geoloc.presets import get_preset, resolve_config


def _params(*path: str) -> dict:
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {p.name: p for p in cmd.params}


def _choices(param) -> list[str]:
    """The values Typer accepts for an enum-typed option (its default is a member of that enum)."""
    return [m.value for m in type(param.default)]


def _field(cls: type, name: str):
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def test_predict_defaults_come_from_predict_and_map_options() -> None:
    p = _params("predict")
    for opt in ("top_k", "samples", "steps", "omega", "localizability", "batch_size", "seed"):
        assert p[opt].default == _field(PredictOptions, opt).default, opt
    assert p["estimator"].default == _field(PredictOptions, "estimator").default
    for opt, name in (
        ("max_maps", "max_maps"),
        ("map_steps", "steps"),
        ("map_start", "start_resolution"),
        ("map_levels", "levels"),
        ("trajectories", "trajectories"),
    ):
        assert p[opt].default == _field(MapOptions, name).default, opt
    assert _choices(p["map_format"]) == list(typing.get_args(_field_type(MapOptions, "format")))


def _field_type(cls: type, name: str):
    return typing.get_type_hints(cls)[name]


def test_embed_and_import_defaults_and_choices() -> None:
    e = _params("embed")
    for opt in ("batch_size", "num_workers", "device", "shard_size", "limit", "replicas", "max_failure_rate"):
        assert e[opt].default == _field(EmbedConfig, opt).default, opt
    assert e["flush_minutes"].default * 60 == _field(EmbedConfig, "flush_interval_s").default
    assert _choices(e["dtype"]) == list(typing.get_args(_field_type(EmbedConfig, "dtype")))
    assert _choices(e["engine"]) == list(typing.get_args(_field_type(EmbedConfig, "engine")))
    i = _params("store", "import")
    for opt in ("split", "emb_key", "revision", "max_failure_rate", "chunk_rows", "progress"):
        assert i[opt].default == _field(ImportConfig, opt).default, opt
    assert _choices(i["kind"]) == ["auto", "wds", "parquet", "numpy"]


def test_demo_defaults_come_from_demo_config() -> None:
    d = _params("demo")
    assert {k: d[k].default for k in ("limit", "steps", "maps")} == {
        "limit": DemoConfig().limit,
        "steps": DemoConfig().steps,
        "maps": DemoConfig().maps,
    }
    assert str(d["out"].default) == str(DemoConfig().out_dir)


def test_vmf_means_no_condition_dropout_in_one_place() -> None:
    assert use_family(FamilyConfig(), "vmf").cond_drop == 0.0
    assert use_family(FamilyConfig(cond_drop=0.3), "rfm-s2").cond_drop == 0.3
    assert (
        get_preset("small-vmf").family.cond_drop == 0.0
        and get_preset("osv5m-vmf-mix").family.cond_drop == 0.0
    )
    assert get_preset("small-rfm-s2").family.cond_drop == FamilyConfig().cond_drop
    # `geoloc train --family vmf` on an RFM preset switches dropout off; --family rfm-s2 keeps the preset's.
    cfg = resolve_config("small", None, ["family.cond_drop=0.2"], family="vmf")
    assert (cfg.family.name, cfg.family.cond_drop) == ("vmf", 0.0)
    cfg = resolve_config("small-vmf", None, [], family="rfm-s2")
    assert (cfg.family.name, cfg.family.cond_drop) == ("rfm-s2", 0.0)
    assert isinstance(resolve_config(), TrainConfig)
