"""Device and precision policy: the one home for ``--device auto`` and ``--dtype auto``.

Kept at the edges on purpose (style: "device and dtype policy at the edges"): the trainer, the embed job,
evaluation and prediction call these once; core maths returns tensors on the device and dtype it was given.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from geoloc.errors import ConfigError

__all__ = ["cpu_info", "native_bf16", "resolve_autocast", "resolve_device"]


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
    """Whether ``device`` computes bf16 natively (CUDA with bf16 support, or a CPU with AVX512-BF16/AMX).

    On a CPU this also needs ATen to dispatch AVX-512 kernels: with ``ATEN_CPU_CAPABILITY=avx2`` (how the
    benches and the demo emulate an AVX2-only CPU on a newer one, docs/benchmarks.md) bf16 would run emulated,
    so it does not count as native.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            return False
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


def cpu_info() -> dict[str, Any]:
    """The CPU a measurement ran on, for every bench record and the demo's summary: model name, cores, the
    bf16-relevant flags, the kernel level ATen dispatches (``AVX2`` when emulating an AVX2-only CPU with
    ``ATEN_CPU_CAPABILITY=avx2``) and whether bf16 counts as native (:func:`native_bf16`)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": native_bf16(torch.device("cpu")),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
