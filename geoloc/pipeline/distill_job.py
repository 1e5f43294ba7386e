"""`geoloc distill` as a library call: a trained checkpoint + its store → a guidance-distilled checkpoint.

The distillation itself (objective, points, loop) is core (:mod:`geoloc.distill`); this job reads the
teacher checkpoint, streams training pairs from the stores it was trained on (the same
:class:`~geoloc.pipeline.loader.FeatureLoader` as ``geoloc train``, with the recorded split and filter unless
told otherwise), and writes the new checkpoint: the teacher's ``model.safetensors`` and config unchanged,
plus ``student.safetensors`` and a ``"distilled"`` record (ω, steps, field error before/after, source), with
the per-step loss in ``distill_metrics.jsonl``. Every file is written atomically, config.json last.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from geoloc.checkpoint import STUDENT_WEIGHTS, read_config, save_checkpoint
from geoloc.config import DistillConfig
from geoloc.devices import resolve_device
from geoloc.distill import DistillResult, distill
from geoloc.errors import ConfigError
from geoloc.files import atomic_write_text
from geoloc.geolocator import Geolocator
from geoloc.pipeline.loader import FeatureLoader
from geoloc.pipeline.selection import StoreSpec

__all__ = ["DistillJobResult", "run_distill"]


@dataclass
class DistillJobResult:
    """Where the distilled checkpoint went and what distillation achieved."""

    out_dir: Path
    result: DistillResult
    omega: float

    def summary(self) -> str:
        r = self.result
        return (
            f"distilled ω={self.omega:g} in {len(r.history)} steps: guided-field error "
            f"{r.field_error_before:.3g} → {r.field_error_after:.3g} (relative RMS, held-out points)\n"
            f"checkpoint: {self.out_dir}"
        )


def _stores_of(cfg: dict[str, Any], checkpoint: Path) -> tuple[list[str], str | None, str | None, int]:
    """(stores, split, where, seed) recorded by ``geoloc train`` in the checkpoint."""
    data = (cfg.get("train") or {}).get("data") or {}
    stores = list(data.get("stores") or [])
    if not stores:
        raise ConfigError(
            f"{checkpoint}/config.json records no training store (a converted checkpoint?); "
            "pass --store DIR with embeddings of the same backbone"
        )
    return stores, data.get("split") or None, data.get("where") or None, int(cfg["train"].get("seed", 0))


def run_distill(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: DistillConfig = DistillConfig(),
    *,
    stores: list[str] | None = None,
    split: str | None = None,
    force: bool = False,
    progress: bool = True,
    command: str = "",
) -> DistillJobResult:
    """Distil ``checkpoint``'s guided field at ``config.omega`` into ``out_dir``.

    ``stores``/``split``: the training pairs (default: what the checkpoint was trained on). ``force``:
    overwrite a checkpoint already in ``out_dir``.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.resolve() == checkpoint.resolve():
        raise ConfigError(f"--out is the teacher checkpoint {checkpoint}; write the student elsewhere")
    if (out_dir / "config.json").exists() and not force:
        raise ConfigError(f"{out_dir} already holds a checkpoint; pass --force to overwrite it")
    cfg = read_config(checkpoint)
    if cfg.get("distilled"):
        raise ConfigError(f"{checkpoint} is already guidance-distilled; distil its teacher instead")
    device = resolve_device(config.device)
    geo = Geolocator.from_pretrained(checkpoint, device=device)
    if not geo.family.uses_guidance:
        raise ConfigError(
            f"{checkpoint}: family {geo.family.name!r} samples without guidance; nothing to distil"
        )
    if stores:
        rec_split, where, seed = split, None, int((cfg.get("train") or {}).get("seed", 0))
    else:
        stores, rec_split, where, seed = _stores_of(cfg, checkpoint)
        rec_split = split or rec_split
    backbone = (cfg.get("backbone") or {}).get("name")
    specs = [StoreSpec.parse(s) for s in stores]

    def loader(seed_offset: int) -> FeatureLoader:
        return FeatureLoader(
            specs,
            config.batch_size,
            split=rec_split,
            where=where,
            seed=seed + seed_offset,
            expected_dim=geo.cond_dim,
            expected_backbone=backbone,
        )

    train_loader = loader(1)
    if train_loader.num_rows < config.batch_size:
        raise ConfigError(
            f"only {train_loader.num_rows} rows for a batch of {config.batch_size}; "
            "use a smaller --batch-size"
        )
    # Held-out points: fresh noise, levels and trajectories on conditions read in another order.
    it = iter(loader(2))
    try:
        vals = [next(it) for _ in range(max(1, -(-config.val_points // config.batch_size)))]
    finally:
        it.close()
    val = (torch.cat([v[0] for v in vals]), torch.cat([v[1] for v in vals]))
    result = distill(geo.net, geo.family, train_loader, config, val=val, progress=progress)
    record = {
        **asdict(config),
        "sampler_steps": list(config.sampler_steps),
        "weights": STUDENT_WEIGHTS,
        "teacher": str(checkpoint),
        "stores": list(stores),
        "split": rec_split,
        **result.summary(),
    }
    out_cfg = {**cfg, "distilled": record, "distill_command": command or " ".join(sys.argv)}
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(h) + "\n" for h in result.history)
    atomic_write_text(out_dir / "distill_metrics.jsonl", lines)
    save_checkpoint(out_dir, geo.net.state_dict(), out_cfg, student_weights=result.student.state_dict())
    return DistillJobResult(out_dir=out_dir, result=result, omega=config.omega)
