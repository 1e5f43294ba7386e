"""`geoloc train` as a library call: feature stores → FeatureLoader → ``geoloc.train.train``.

The trainer (core) knows nothing about stores; this module wires the two: it opens the stores, checks a
fine-tuning checkpoint against them, picks this process's rank for DDP (``torchrun`` sets RANK/WORLD_SIZE),
holds out a validation sample, and records the data provenance in the checkpoint's ``config.json``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from geoloc.checkpoint import read_config
from geoloc.config import TrainConfig
from geoloc.errors import ConfigError, StoreError
from geoloc.pipeline.engines import sigterm_as_interrupt
from geoloc.pipeline.eval_batches import iter_eval_batches
from geoloc.pipeline.loader import FeatureLoader
from geoloc.pipeline.selection import StoreSpec
from geoloc.sphere import latlon_to_xyz
from geoloc.train import TrainResult, train

__all__ = ["run_train"]


FINETUNE_WARMUP_FRACTION = 0.1


def fit_finetune_schedule(config: TrainConfig) -> TrainConfig:
    """A fine-tune's warm-up is at most 10% of its steps, so a short run (``--steps 100`` from the small
    preset's 500-step warm-up) still decays instead of ending at the peak learning rate.

    The weights start trained, so a long warm-up buys nothing.
    """
    cap = max(1, int(config.steps * FINETUNE_WARMUP_FRACTION))
    if config.optim.warmup_steps <= cap:
        return config
    return replace(config, optim=replace(config.optim, warmup_steps=cap))


def _validation_pairs(config: TrainConfig, stores: list[str], dim: int, backbone: str):
    """Up to ``config.val_samples`` held-out pairs from ``data.val_split`` (none if unset)."""

    if not config.data.val_split or config.val_samples <= 0:
        return None
    conds, xyzs, have = [], [], 0
    for batch in iter_eval_batches(
        stores,
        config.data.val_split,
        4096,
        config.data.where or None,
        expected_dim=dim,
        expected_backbone=backbone,
    ):
        conds.append(batch.cond)
        xyzs.append(latlon_to_xyz(torch.from_numpy(batch.latlon)).float())
        have += batch.cond.shape[0]
        if have >= config.val_samples:
            break
    if not conds:
        return None
    return torch.cat(conds)[: config.val_samples], torch.cat(xyzs)[: config.val_samples]


def run_train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    init_from: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``config`` on ``config.data.stores`` into ``out_dir`` (resuming a run found there)."""

    if not config.data.stores:
        raise ConfigError("no feature store given; pass --store DIR (repeat for several, DIR:WEIGHT to mix)")
    if config.steps <= 0:
        raise ConfigError(f"--steps must be a positive number of training steps, got {config.steps}")
    if init_from is not None:
        if Path(init_from).resolve() == Path(out_dir).resolve():
            raise ConfigError(
                f"--init-from and --out are the same directory ({out_dir}); a fine-tune writes a "
                "new run: pick another --out (to continue that run itself, drop --init-from)"
            )
        config = fit_finetune_schedule(config)
    specs = [StoreSpec.parse(s) for s in config.data.stores]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    expected_dim = expected_backbone = None
    if init_from is not None:
        src = read_config(init_from)
        expected_dim = int(src["cond_dim"])
        expected_backbone = (src.get("backbone") or {}).get("name")
    if config.data.batch_size % world:
        raise ConfigError(f"batch size {config.data.batch_size} is not divisible by the {world} processes")
    partitions = max(config.data.partitions, world)
    loader = FeatureLoader(
        specs,
        config.data.batch_size,
        split=config.data.split or None,
        where=config.data.where or None,
        seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer,
        partitions=partitions,
        rank=rank,
        world_size=world,
        expected_dim=expected_dim,
        expected_backbone=expected_backbone,
        pin_memory=torch.cuda.is_available(),
    )
    if loader.num_rows < config.data.batch_size:
        raise StoreError(
            f"only {loader.num_rows} training rows for a batch of {config.data.batch_size}; "
            "use a smaller --batch-size"
        )
    config = replace(config, data=replace(config.data, partitions=partitions))
    val = _validation_pairs(config, [str(s.path) for s in specs], loader.dim, loader.backbone_name)
    provenance = loader.describe()
    backbone = provenance["stores"][0]["backbone"]
    meta = {"backbone": backbone, "data": provenance}
    with sigterm_as_interrupt():  # SIGTERM too writes a checkpoint at the current step (geoloc.train)
        return train(
            config,
            loader,
            out_dir,
            loader.dim,
            val=val,
            meta=meta,
            init_from=init_from,
            resume=resume,
            progress=progress,
            stop_after=stop_after,
        )
