"""Probability paths: what makes diffusion, flow matching and Riemannian flow matching different.

A path joins a prior draw ``x0`` to a data point ``x1`` through the *signal level* ``s ∈ [0, 1]``
(``s = 0`` is the prior, ``s = 1`` the data; a schedule maps time t to s, see ``schedules.py``). Each path
owns everything that depends on which family it is, so :class:`geoloc.families.OdeFamily` has no branches:

- the **space** the solvers walk (``Sphere`` or ``Euclidean``) and the **prior** (sample + log-density);
- :meth:`Path.interpolate` → :class:`PathSample` (``x_s`` and the regression target);
- :meth:`Path.to_velocity`: the network output turned into ``dx/ds`` (ε → velocity for VP);
- how samples are drawn (:meth:`Path.solve`: an ODE solver, or DDIM for VP) and which ODE the likelihood
  integrates (:meth:`Path.likelihood_problem`).

=============  =========  ======================================  =========  ==================
path           space      x_s                                     target     prior
=============  =========  ======================================  =========  ==================
VPPath         R³         √s·x1 + √(1−s)·x0  (variance-preserving) ε = x0    N(0, I₃)
LinearPath     R³         s·x1 + (1−s)·x0                         x1 − x0    N(0, I₃)
GeodesicPath   S²         exp_x0(s·log_x0(x1))                    dx_s/ds    uniform on S²
=============  =========  ======================================  =========  ==================

The network is never called here: paths receive ``out_fn(x, s)``, the (guided) network output, from the
family, which keeps the one place the network is evaluated (``OdeFamily.network_output``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from geoloc.errors import ConfigError
from geoloc.solvers import integrate
from geoloc.sphere import UNIFORM_LOG_DENSITY, Euclidean, Sphere, geodesic, proj_tangent, sample_uniform

__all__ = ["PATHS", "GeodesicPath", "LikelihoodProblem", "LinearPath", "Path", "PathSample", "VPPath"]

OutputFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_GAUSS_CONST = -1.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class PathSample:
    """A point ``x (M, 3)`` on the path at signal level s and what the network regresses there."""

    x: torch.Tensor
    target: torch.Tensor


@dataclass(frozen=True)
class LikelihoodProblem:
    """The ODE the likelihood integrates: field ``f(x, τ)``, grid from data to prior, the prior's density."""

    field: OutputFn
    grid: torch.Tensor
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor]
    prior_sample: Callable[..., torch.Tensor]


class Path:
    """Base class; see the module docstring. ``target`` names what the network predicts."""

    name: str = ""
    target: str = "velocity"

    @property
    def space(self) -> Sphere | Euclidean:
        raise NotImplementedError

    @property
    def on_sphere(self) -> bool:
        return isinstance(self.space, Sphere)

    def prior_sample(self, m: int, generator, device, dtype) -> torch.Tensor:
        raise NotImplementedError

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, s: torch.Tensor) -> PathSample:
        """``x_s`` and the target for prior draws ``x0``, data ``x1`` (both ``(M, 3)``), levels ``s (M,)``."""
        raise NotImplementedError

    def to_velocity(
        self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, tangent: bool = True
    ) -> torch.Tensor:
        """``dx/ds`` at ``(x, s)`` from the network output ``out`` there (``tangent`` matters on S² only)."""
        return out

    def sampling_space(self, retraction: str) -> Sphere | Euclidean:
        return self.space

    def solve(
        self,
        out_fn: OutputFn,
        x: torch.Tensor,
        grid: torch.Tensor,
        method: str,
        retraction: str = "exp",
        trajectory: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Carry prior draws ``x`` along the signal ``grid`` (prior → data) with the named solver."""
        if method == "ddim":
            raise ConfigError(
                f"'ddim' samples the diffusion family only; "
                f"{self.name} paths use euler, heun, midpoint or rk4"
            )
        tangent = retraction != "project"

        def velocity(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.to_velocity(out_fn(y, s), y, s, tangent)

        return integrate(velocity, self.sampling_space(retraction), x, grid, method, trajectory)

    def likelihood_problem(self, out_fn: OutputFn, s_grid: torch.Tensor) -> LikelihoodProblem:
        """The probability-flow ODE in ``s`` on ``s_grid`` (data → prior) with this path's prior."""

        def velocity(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.to_velocity(out_fn(y, s), y, s)

        return LikelihoodProblem(velocity, s_grid, self.prior_log_prob, self.prior_sample)


class _GaussianPrior:
    """N(0, I₃), the prior of both R³ paths."""

    @property
    def space(self) -> Euclidean:
        return Euclidean()

    def prior_sample(self, m: int, generator, device, dtype) -> torch.Tensor:
        return torch.randn((m, 3), generator=generator, dtype=dtype, device=device)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return _GAUSS_CONST - 0.5 * (x * x).sum(-1)


class GeodesicPath(Path):
    """Riemannian flow matching on S²: uniform prior, constant-speed geodesics, tangent-velocity target.

    The loss ``mean ‖ψ − u‖²/3`` on the raw 3-vector output is the squared Riemannian error of its tangent
    part plus a penalty on its normal part (docs/reference-behaviour.md §6); at sampling the output is
    projected onto the tangent plane unless the reference's ``retraction="project"`` step is asked for
    (docs/reference-behaviour.md §7.3).
    """

    name = "geodesic"
    target = "velocity"

    @property
    def space(self) -> Sphere:
        return Sphere()

    def prior_sample(self, m: int, generator, device, dtype) -> torch.Tensor:
        return sample_uniform(m, generator, dtype, device)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full(x.shape[:-1], UNIFORM_LOG_DENSITY, dtype=x.dtype, device=x.device)

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, s: torch.Tensor) -> PathSample:
        xs, vel = geodesic(x0, x1, s)
        return PathSample(xs, vel)

    def to_velocity(
        self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, tangent: bool = True
    ) -> torch.Tensor:
        return proj_tangent(x, out) if tangent else out

    def sampling_space(self, retraction: str) -> Sphere:
        return Sphere(retraction)


class LinearPath(_GaussianPrior, Path):
    """Flow matching in R³: Gaussian prior, straight lines ``s·x1 + (1−s)·x0``, velocity target ``x1 − x0``.

    No κ'² weight on the loss, as in the reference (docs/reference-behaviour.md §6).
    """

    name = "linear"
    target = "velocity"

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, s: torch.Tensor) -> PathSample:
        sc = s.unsqueeze(-1)
        return PathSample(sc * x1 + (1 - sc) * x0, x1 - x0)


class VPPath(_GaussianPrior, Path):
    """Diffusion in R³: variance-preserving ``√s·x1 + √(1−s)·ε``, ε-prediction, DDIM sampling.

    The only path that samples with DDIM (``method`` ``euler`` or its alias ``ddim``); its likelihood ODE runs
    in DDIM's own coordinates (see :meth:`likelihood_problem`).
    """

    name = "vp"
    target = "epsilon"

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, s: torch.Tensor) -> PathSample:
        sc = s.unsqueeze(-1)
        return PathSample(sc.sqrt() * x1 + (1 - sc).sqrt() * x0, x0)

    def to_velocity(
        self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, tangent: bool = True
    ) -> torch.Tensor:
        # Probability-flow ODE from ε-prediction: with x̂ = (x − √(1−s)ε̂)/√s,
        # dx/ds = x̂/(2√s) − ε̂/(2√(1−s)) = x/(2s) − ε̂/(2s√(1−s)).
        # reference differs: its PF-ODE omits the 1/√(1−s) score factor (docs/reference-behaviour.md §16.2).
        sc = s.unsqueeze(-1)
        return x / (2 * sc) - out / (2 * sc * (1 - sc).sqrt())

    def solve(self, out_fn, x, grid, method, retraction="exp", trajectory=None):
        """Deterministic DDIM (η = 0), x̂ clamped to [−1, 1]: Euler in DDIM coordinates.

        As the reference samples (docs/reference-behaviour.md §7.1).
        """
        if method not in ("euler", "ddim"):
            raise ConfigError(
                f"diffusion-r3 samples with 'ddim' (alias 'euler'); {method!r} is for the flow families"
            )
        grid = grid.to(x.dtype).to(x.device)
        for k in range(len(grid) - 1):
            s, s_next = grid[k], grid[k + 1]
            eps = out_fn(x, s.expand(x.shape[0]))
            x0 = ((x - (1 - s).sqrt() * eps) / s.sqrt()).clamp(-1.0, 1.0)
            eps = (x - s.sqrt() * x0) / (1 - s).sqrt()
            x = s_next.sqrt() * x0 + (1 - s_next).sqrt() * eps
            if trajectory is not None:
                trajectory.append(x)
        return x

    def likelihood_problem(self, out_fn: OutputFn, s_grid: torch.Tensor) -> LikelihoodProblem:
        """The PF-ODE in the coordinates where DDIM is Euler's method.

        ``y = x/√s`` with noise level ``σ = √((1−s)/s)``, where the probability-flow ODE is
        ``dy/dσ = ε̂(√s·y, s)``: unlike the x-form (terms x/(2s) and 1/√(1−s)) it has no singularity, and the
        data end is σ = 0, where y = x. Time is τ = asinh(σ), in which both dy/dτ/|y| and the divergence stay
        O(1) up to the prior end; the grid is ``s_grid`` mapped to τ, with intervals longer than 0.35 split.
        Integration stops at σ = 100, where ``y = x_data + σ·ε`` is N(0, (σ² + 1/3)·I) up to O(σ⁻⁴)
        (E|x_data|² = 1): that Gaussian is the prior of the density we report, so it integrates to exactly 1
        for any network.
        """
        sigma_end = 100.0
        sigma = ((1 - s_grid) / s_grid).sqrt()
        sigma = torch.cat([sigma[sigma < sigma_end], sigma.new_tensor([sigma_end])])
        tau = torch.asinh(sigma)
        pieces = [tau[:1]]
        for a, b in itertools.pairwise(tau):
            k = max(1, math.ceil(float(b - a) / 0.35))
            pieces.append(torch.linspace(float(a), float(b), k + 1, dtype=tau.dtype)[1:])
        tau_grid = torch.cat(pieces)
        var_end = sigma_end**2 + 1.0 / 3.0

        def dy_dtau(y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            ch = torch.cosh(tau).unsqueeze(-1)  # 1/√s
            return ch * out_fn(y / ch, 1.0 / (ch * ch).squeeze(-1))

        def prior(y: torch.Tensor) -> torch.Tensor:
            return _GAUSS_CONST - 1.5 * math.log(var_end) - 0.5 * (y * y).sum(-1) / var_end

        def prior_sample(m: int, generator, device, dtype) -> torch.Tensor:
            return math.sqrt(var_end) * torch.randn((m, 3), generator=generator, device=device, dtype=dtype)

        return LikelihoodProblem(dy_dtau, tau_grid, prior, prior_sample)


PATHS: dict[str, type[Path]] = {"vp": VPPath, "linear": LinearPath, "geodesic": GeodesicPath}
