"""The trainer: one loop you can read top to bottom (nanoGPT's shape), for every family.

``train(config, batches, out_dir, cond_dim)`` builds the family's network, then per step: set the learning
rate (linear warm-up, cosine to 0), draw the step's random numbers, compute the family's loss (under bf16
autocast where the device supports it), clip, step, update the EMA, log; every ``eval_every`` steps a
validation loss and a quick GeoScore on held-out pairs; every ``ckpt_every`` steps an atomic checkpoint.

Design points:
- **Data comes from any iterable** of ``(cond, xyz)`` batches (``pipeline.loader.FeatureLoader`` for stores,
  ``batches.InMemoryBatches`` for tensors). Its ``state_dict`` goes into the checkpoint, so a resumed run
  reads the same data in the same order.
- **Randomness is a function of (seed, step)**: the noise, times and condition-dropout mask of step k are
  drawn for the *global* batch from a generator seeded with (seed, k), and each DDP rank takes its slice. A
  resumed run therefore repeats the uninterrupted loss curve, and N ranks reproduce one process with the same
  global batch.
- **EMA that averages**: ``ema ← d·ema + (1−d)·θ`` via ``torch.optim.swa_utils``. # reference differs: its
  ``lerp`` keeps 99.9 % of the *new* weights (docs/reference-behaviour.md §16.1). Both raw and EMA weights are
  saved; evaluation uses EMA.
- **Weight decay only on matrices** (nanoGPT); LAMB (the paper's optimiser, timm's) and AdamW (foreach).
- A non-finite loss stops the run with :class:`TrainingError`; the last good checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from geoloc.checkpoint import load_into, load_state, load_weights, read_config, save_checkpoint, save_state
from geoloc.config import SampleConfig, TrainConfig, config_to_dict
from geoloc.devices import resolve_autocast, resolve_device
from geoloc.errors import CheckpointError, TrainingError
from geoloc.families import Family, check_cond, check_xyz, make_family
from geoloc.files import atomic_write_text
from geoloc.metrics import GEOSCORE_MAX, GEOSCORE_SCALE_KM
from geoloc.sphere import EARTH_RADIUS_KM, angle

__all__ = ["TrainResult", "lr_at", "train"]


def _truncate_metrics(log_path: Path, step: int) -> None:
    """On resume, drop records past the resumed step (written after the last checkpoint by a run that then
    crashed) and mark the resume, so a plotted curve has each step once."""
    kept = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            if int(json.loads(line).get("step", 0)) <= step:
                kept.append(line)
    kept.append(json.dumps({"resumed_at_step": step}))
    atomic_write_text(log_path, "\n".join(kept) + "\n")


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to 0 at ``total``
    (docs/reference-behaviour.md §11.3)."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def _make_optimizer(net: nn.Module, cfg) -> torch.optim.Optimizer:
    decay = [p for p in net.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "lamb":
        return _lamb(groups, cfg)
    # Fused (one pass over param, grad and both moments per tensor): on a 2-core AVX2 CPU the step of the
    # paper network took 71 ms fused vs 454 ms foreach and 547 ms single-tensor (bench/records/speed_train_*).
    # reference differs: torch's default AdamW, the single-tensor loop on CPU.
    fused = all(p.device.type in ("cpu", "cuda") for p in net.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused, foreach=None if fused else True)


def _lamb(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """timm's LAMB set to the reference's update rule (docs/reference-behaviour.md §11.2): Adam's
    bias-corrected step plus L2 decay, times the trust ratio ‖w‖/‖step‖ (1 where either norm is 0) only in
    groups with weight decay > 0; eps 1e-8; no built-in global gradient clipping (the trainer clips by
    ``optim.grad_clip``).

    # reference differs: it puts every tensor in one decayed group (biases too,
    # docs/reference-behaviour.md §16.16); ours leaves 1-D tensors undecayed, and there the reference's own
    # rule (no decay ⇒ no layer adaptation) applies.
    """
    # Lazy: importing timm costs seconds and only the paper presets (LAMB) need it.
    from timm.optim import Lamb

    return Lamb(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=1e-8,
        max_grad_norm=None,
        always_adapt=False,
        trust_clip=False,
        bias_correction=True,
        grad_averaging=True,
    )


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


@dataclass
class TrainResult:
    """What a run produced: the checkpoint directory, the last step and the logged metrics."""

    out_dir: Path
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _distributed() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment, initialising the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


@torch.no_grad()
def quick_geoscore(
    family: Family, net: nn.Module, cond: torch.Tensor, xyz: torch.Tensor, steps: int = 32
) -> float:
    """Mean GeoScore of one guided draw (ω = 2, ``steps`` Euler steps) per held-out pair: a cheap progress
    signal."""
    point = family.point(net, cond)
    if point is None:
        point = family.sample(
            net, cond, 1, SampleConfig(steps=steps, omega=2.0 if family.uses_guidance else 0.0)
        )[:, 0]
    dist_km = angle(point.float(), xyz.float()) * EARTH_RADIUS_KM
    return float((GEOSCORE_MAX * torch.exp(-dist_km / GEOSCORE_SCALE_KM)).mean())


def train(
    config: TrainConfig,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    out_dir: str | Path,
    cond_dim: int,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    init_from: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``config``'s family on ``batches`` and checkpoint into ``out_dir``; resume if it holds a run.

    Args:
        batches: yields this rank's ``(cond (B, cond_dim), xyz (B, 3))``; B = global batch / world size.
        val: held-out ``(cond, xyz)`` for the periodic validation loss and GeoScore.
        meta: provenance merged into ``config.json`` (backbone, stores, command).
        init_from: a checkpoint whose weights start this run (fine-tuning); must match the architecture.
        stop_after: stop (with a checkpoint) after this many steps of *this call* — to test resumption.
    """
    out_dir = Path(out_dir)
    rank, world = _distributed()
    device = resolve_device(config.device)
    amp = resolve_autocast(config.dtype, device)
    family = make_family(config.family)
    if not family.trainable:
        raise TrainingError(f"family {config.family.name!r} has nothing to train; evaluate it directly")
    torch.manual_seed(config.seed)  # network initialisation
    net = family.build_network(config.model, cond_dim).to(device)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay), use_buffers=True)
    opt = _make_optimizer(net, config.optim)
    step = 0
    ckpt_config = {
        "family": config_to_dict(config.family),
        "model": config_to_dict(config.model),
        "cond_dim": cond_dim,
        "train": config_to_dict(config),
        "command": " ".join(sys.argv),
        **(meta or {}),
    }

    state = load_state(out_dir) if resume else None
    if state is not None:
        saved = read_config(out_dir)
        if saved.get("family") != ckpt_config["family"] or saved.get("model") != ckpt_config["model"]:
            raise CheckpointError(
                f"{out_dir}: holds a run with another family/architecture; use a new --out or delete it"
            )
        load_into(net, load_weights(out_dir, raw=True), str(out_dir))
        load_into(ema.module, load_weights(out_dir), str(out_dir))
        ema.n_averaged.fill_(int(state["ema_n_averaged"]))
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if hasattr(batches, "load_state_dict") and state.get("data"):
            batches.load_state_dict(json.loads(state["data"]))
    elif init_from is not None:
        src = read_config(init_from)
        if src.get("model") != ckpt_config["model"] or int(src.get("cond_dim", -1)) != cond_dim:
            raise CheckpointError(
                f"--init-from {init_from}: architecture/condition width differ from this run "
                f"({src.get('model')}, cond_dim={src.get('cond_dim')} vs {ckpt_config['model']}, {cond_dim})"
            )
        weights = load_weights(init_from)
        load_into(net, weights, f"--init-from {init_from}")
        ema.module.load_state_dict(weights)
        ckpt_config["init_from"] = str(init_from)

    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net)
    history: list[dict[str, Any]] = []
    log_path = out_dir / "metrics.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if step > 0 and log_path.exists():
            _truncate_metrics(log_path, step)

    def checkpoint(at_step: int) -> None:
        if rank != 0:
            return
        save_checkpoint(
            out_dir, ema.module.state_dict(), {**ckpt_config, "step": at_step}, raw_weights=net.state_dict()
        )
        data_state = json.dumps(batches.state_dict()) if hasattr(batches, "state_dict") else ""
        save_state(
            out_dir,
            {
                "step": at_step,
                "optimizer": opt.state_dict(),
                "ema_n_averaged": int(ema.n_averaged),
                "data": data_state,
            },
        )

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.family.name}", unit="step")
    started, last_t, last_step = step, time.perf_counter(), step
    it = iter(batches)
    net.train()
    try:
        while step < config.steps:
            if stop_after is not None and step - started >= stop_after:
                break
            cond, xyz = next(it)
            cond, xyz = cond.to(device, non_blocking=True), xyz.to(device, non_blocking=True)
            if step == started:
                check_cond(cond, cond_dim, "training batch")
                check_xyz(xyz, "training batch coordinates")
            lr = lr_at(step, config.optim.lr, config.optim.warmup_steps, config.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            local = cond.shape[0]
            draws = family.draw(
                local * world, _step_generator(config.seed, step), torch.device("cpu"), torch.float32
            )
            draws = {k: v[rank * local : (rank + 1) * local].to(device) for k, v in draws.items()}
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = family.loss(model, xyz, cond, draws=draws)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"non-finite loss ({loss_value}) at step {step}; "
                    f"the last good checkpoint in {out_dir} is kept. "
                    "Lower optim.lr, set optim.grad_clip, or check the data for NaN embeddings"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(net.parameters(), config.optim.grad_clip)
            opt.step()
            ema.update_parameters(net)
            step += 1

            record: dict[str, Any] | None = None
            if step % config.log_every == 0 or step == config.steps:
                now = time.perf_counter()
                rate = (step - last_step) / max(now - last_t, 1e-9)
                last_t, last_step = now, step
                record = {
                    "step": step,
                    "loss": loss_value,
                    "lr": lr,
                    "steps_per_s": rate,
                    "samples_per_s": rate * local * world,
                }
            if val is not None and rank == 0 and (step % config.eval_every == 0 or step == config.steps):
                record = record or {"step": step, "loss": loss_value, "lr": lr}
                vc, vx = val[0].to(device), val[1].to(device)
                ema.module.eval()
                with torch.no_grad():
                    record["val_loss"] = float(
                        family.loss(
                            ema.module, vx, vc, generator=torch.Generator(device=device).manual_seed(0)
                        )
                    )
                    record["val_geoscore"] = quick_geoscore(family, ema.module, vc, vx)
            if record is not None and rank == 0:
                history.append(record)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"})
            if bar is not None:
                bar.update(1)
            if step % config.ckpt_every == 0 and step < config.steps:
                checkpoint(step)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the pipeline maps it to this): keep the work done
        checkpoint(step)
        if rank == 0:
            print(
                f"interrupted: checkpoint written at step {step} in {out_dir}; "
                "run the same command to resume",
                file=sys.stderr,
            )
        raise
    finally:
        if bar is not None:
            bar.close()
    checkpoint(step)
    return TrainResult(out_dir=out_dir, step=step, history=history)
