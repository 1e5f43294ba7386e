"""Checkpoints: ``model.safetensors`` + ``config.json`` (+ ``train_state.pt`` to resume), written atomically.

A checkpoint directory holds:
- ``model.safetensors``: the weights evaluation uses (the EMA weights after training);
- ``model_raw.safetensors``: the raw (non-averaged) weights, when they differ;
- ``student.safetensors``: a guidance-distilled checkpoint's one-pass student (``geoloc.distill``; its
  config.json says ``"distilled": {"omega": ...}``), next to the teacher's own ``model.safetensors``;
- ``config.json``: everything needed to rebuild the model and say where it came from: family, schedule,
  architecture, condition width, backbone and feature-store identity, the training command and data
  provenance;
- ``train_state.pt``: optimiser, step and loader position, only for ``geoloc train`` to resume. It holds
  tensors and plain containers and is read with ``torch.load(weights_only=True)``; weights are never pickled.

``geoloc.convert.convert_plonk`` turns the reference's published hub layout (its ``model.safetensors`` with
the ``GeoAdaLNMLP`` names, and a ``config.json`` with cond_dim/depth/dim/expansion/input_dim,
docs/reference-behaviour.md §12) into ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from geoloc.errors import CheckpointError
from geoloc.files import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "STUDENT_WEIGHTS",
    "load_into",
    "load_state",
    "load_weights",
    "read_config",
    "save_checkpoint",
    "save_state",
]

CHECKPOINT_FORMAT = "geoloc-checkpoint"
STUDENT_WEIGHTS = "student.safetensors"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    directory: str | Path,
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    raw_weights: dict[str, torch.Tensor] | None = None,
    student_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights and config atomically (config last, so a readable config means complete weights).

    ``student_weights``: a guidance-distilled student, written to ``student.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": CHECKPOINT_FORMAT}
    atomic_write(directory / "model.safetensors", lambda p: save_file(_contiguous(weights), p, metadata=meta))
    if raw_weights is not None:
        atomic_write(
            directory / "model_raw.safetensors",
            lambda p: save_file(_contiguous(raw_weights), p, metadata=meta),
        )
    if student_weights is not None:
        atomic_write(
            directory / STUDENT_WEIGHTS,
            lambda p: save_file(_contiguous(student_weights), p, metadata=meta),
        )
    body = json.dumps({"format": CHECKPOINT_FORMAT, "version": 1, **config}, indent=2, default=str)
    atomic_write(directory / "config.json", lambda p: Path(p).write_text(body))
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` (CheckpointError with the path if missing or unreadable)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json; is this a geoloc checkpoint directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is corrupt") from e
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a geoloc checkpoint (format={data.get('format')!r}); "
            "convert a PLONK checkpoint with `geoloc convert plonk SRC OUT`"
        )
    return data


def load_weights(directory: str | Path, raw: bool = False, student: bool = False) -> dict[str, torch.Tensor]:
    """The EMA weights, the raw ones (``raw``) or a distilled checkpoint's student (``student``)."""
    name = STUDENT_WEIGHTS if student else "model_raw.safetensors" if raw else "model.safetensors"
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{directory}: missing {name}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path}: cannot read weights ({e}); the file is corrupt or truncated") from e


def load_into(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], where: str, architecture: str = ""
) -> None:
    """Load ``weights`` into ``module`` (built from a config.json), or raise one line saying what doesn't fit.

    torch's own size-mismatch error lists every tensor (37 lines for a small network when ``dim`` is edited
    in config.json, issue 11); this names the checkpoint, how many tensors differ, and one of each kind (the
    largest of those of another shape, with both shapes). ``where``: the checkpoint as the user named it (e.g.
    ``"--init-from runs/a"``); ``architecture``: what config.json says (e.g. ``"dim=48, depth=2"``).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    resized = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or resized:
        parts = []
        if resized:
            k = max(resized, key=lambda name: own[name].numel())
            parts.append(
                f"{len(resized)} of {len(own)} tensors have another shape (largest: {k} is "
                f"{_shape(weights[k])} in the weights, {_shape(own[k])} for config.json)"
            )
        if missing:
            parts.append(f"{len(missing)} missing from the weights (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in this architecture (first: {unexpected[0]})")
        arch = f" ({architecture})" if architecture else ""
        raise CheckpointError(
            f"{where}: the weights do not fit the architecture config.json describes{arch}: "
            f"{'; '.join(parts)}; "
            "was config.json edited? restore it, or use the checkpoint it came with"
        )
    module.load_state_dict(weights)


def _shape(t: torch.Tensor) -> str:
    return "×".join(str(n) for n in t.shape) or "scalar"


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    """The resume state (optimiser tensors, step, loader position), atomically."""
    atomic_write(Path(directory) / "train_state.pt", lambda p: torch.save(state, p))


def load_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / "train_state.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the resume state ({e}); delete it to start over") from e
