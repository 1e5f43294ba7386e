"""Noise schedules: the signal level s = α(t) of every path, with exact derivatives.

**The one time convention of geoloc** (as in facebookresearch/flow_matching): ``t = 0`` is the prior (pure
noise), ``t = 1`` is the data. The *signal level* ``s = α(t)`` rises from 0 to 1. For the affine paths
``x_s = a(s)·x_data + b(s)·noise``; for the geodesic path ``x_s`` lies a fraction ``s`` of the way from the
noise point to the data point.

The reference code runs time the other way: its ``γ(t_ref)`` is the signal level with ``γ(0) = 1`` (data) and
``γ(1) = 0`` (noise), and the paper writes ``κ = 1 − γ`` (docs/reference-behaviour.md §5, §15.1–§15.3). So
``α(t) = γ_ref(1 − t)`` and ``α'(t) = −γ_ref'(1 − t)``. The signal level itself is the same number in both
conventions, and it is what the network sees (its time embedding is fed ``1000·s``), so checkpoints move
between the two without change. The reference's inverted time appears only here and in
``convert.py``.

Like the reference, ``α`` is clamped to ``[1e-9, 1]`` (it is divided by in DDIM) while ``α'`` is exact and
unclamped. The reference's cosine derivative has an extra cos factor (docs/reference-behaviour.md §16.13);
ours is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from geoloc.errors import ConfigError

__all__ = ["SCHEDULES", "CosineSchedule", "LinearSchedule", "Schedule", "SigmoidSchedule", "make_schedule"]

SIGNAL_MIN = 1e-9


class Schedule:
    """Base class: subclasses define ``_gamma_ref(u)`` and ``_dgamma_ref(u)`` in the reference's time u."""

    name: str = ""

    def _gamma_ref(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dgamma_ref(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def signal(self, t: torch.Tensor) -> torch.Tensor:
        """α(t) ∈ [1e-9, 1]: the signal level at time t (t=0 noise, t=1 data)."""
        t = torch.as_tensor(t)
        return self._gamma_ref(1.0 - t).clamp(SIGNAL_MIN, 1.0)

    def dsignal(self, t: torch.Tensor) -> torch.Tensor:
        """α'(t) = dα/dt, exact and unclamped."""
        t = torch.as_tensor(t)
        return -self._dgamma_ref(1.0 - t)

    def time_of_signal(self, s: float) -> float:
        """Inverse of α by bisection (α is monotone): the t with α(t) = s."""
        lo, hi = 0.0, 1.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if float(self.signal(torch.tensor(mid, dtype=torch.float64))) < s:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def params(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class SigmoidSchedule(Schedule):
    """γ_ref(u) = (σ(e/τ) − σ((b + u(e − b))/τ)) / (σ(e/τ) − σ(b/τ)).

    Every PLONK experiment uses b=−7, e=3, τ=1.
    (The paper's "α=−3, β=7" does not reproduce the released models; docs/reference-behaviour.md §5.3.)
    """

    start: float = -7.0
    end: float = 3.0
    tau: float = 1.0
    name: str = "sigmoid"

    def _consts(self) -> tuple[float, float]:
        vs = 1.0 / (1.0 + math.exp(-self.start / self.tau))
        ve = 1.0 / (1.0 + math.exp(-self.end / self.tau))
        return vs, ve

    def _gamma_ref(self, u: torch.Tensor) -> torch.Tensor:
        vs, ve = self._consts()
        x = (self.start + u * (self.end - self.start)) / self.tau
        return (ve - torch.sigmoid(x)) / (ve - vs)

    def _dgamma_ref(self, u: torch.Tensor) -> torch.Tensor:
        vs, ve = self._consts()
        x = (self.start + u * (self.end - self.start)) / self.tau
        sg = torch.sigmoid(x)
        return -(self.end - self.start) * sg * (1.0 - sg) / (self.tau * (ve - vs))

    def params(self) -> dict:
        return {"start": self.start, "end": self.end, "tau": self.tau}


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """α(t) = t (the reference's γ = 1 − t; its start/end arguments are ignored there too)."""

    name: str = "linear"

    def _gamma_ref(self, u: torch.Tensor) -> torch.Tensor:
        return 1.0 - u

    def _dgamma_ref(self, u: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(u)
        return torch.full_like(u, -1.0, dtype=u.dtype if u.is_floating_point() else torch.get_default_dtype())

    def params(self) -> dict:
        return {}


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """γ_ref(u) = (cos(x)^{2τ} − v_e)/(v_s − v_e), x = (b + u(e − b))π/2; b=1, e=0, τ=1 gives γ = cos²(πu/2).

    # reference differs: its derivative carries an extra cos(x) factor (docs/reference-behaviour.md §16.13);
    # this one is exact.
    """

    start: float = 1.0
    end: float = 0.0
    tau: float = 1.0
    name: str = "cosine"

    def _consts(self) -> tuple[float, float]:
        vs = math.cos(self.start * math.pi / 2) ** (2 * self.tau)
        ve = math.cos(self.end * math.pi / 2) ** (2 * self.tau)
        return vs, ve

    def _gamma_ref(self, u: torch.Tensor) -> torch.Tensor:
        vs, ve = self._consts()
        x = (self.start + u * (self.end - self.start)) * math.pi / 2
        return (torch.cos(x).clamp_min(0.0) ** (2 * self.tau) - ve) / (vs - ve)

    def _dgamma_ref(self, u: torch.Tensor) -> torch.Tensor:
        vs, ve = self._consts()
        x = (self.start + u * (self.end - self.start)) * math.pi / 2
        c = torch.cos(x).clamp_min(0.0)
        d = 2 * self.tau * c ** (2 * self.tau - 1) * (-torch.sin(x)) * (self.end - self.start) * math.pi / 2
        return d / (vs - ve)

    def params(self) -> dict:
        return {"start": self.start, "end": self.end, "tau": self.tau}


SCHEDULES: dict[str, type[Schedule]] = {
    "sigmoid": SigmoidSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
}


def make_schedule(name: str, params: dict | None = None) -> Schedule:
    """Build a schedule by registry name (``sigmoid``, ``linear``, ``cosine``) with optional parameters."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[name](**(params or {}))
    except TypeError as e:
        raise ConfigError(f"schedule {name!r}: bad parameters {params}: {e}") from e
