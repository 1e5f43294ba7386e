"""Device and precision policy: the one home for ``--device auto`` and ``--dtype auto``.

Kept at the edges on purpose (style: "device and dtype policy at the edges"): the trainer, the embed job,
evaluation and prediction call these once; core maths returns tensors on the device and dtype it was given.
"""

from __future__ import annotations

import torch

from geoloc.errors import ConfigError

__all__ = ["native_bf16", "resolve_autocast", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else is checked and returned.

    Raises ``ConfigError`` for a string torch does not parse, or a CUDA device on a machine without CUDA.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16 support, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def resolve_autocast(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``dtype`` in {auto, fp32, bf16}: ``auto`` is bf16 only where it is native.

    On a CPU without native bf16 (AVX2 only: most users' machines) emulated bf16 is slower than fp32, so
    ``auto`` means fp32 there (returns ``None``: no autocast).
    """
    if dtype in ("fp32", "float32"):
        return None
    if dtype in ("bf16", "bfloat16"):
        return torch.bfloat16
    if dtype != "auto":
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, fp32 or bf16")
    return torch.bfloat16 if native_bf16(device) else None
