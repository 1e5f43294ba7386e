"""The generative families behind one interface: ``loss``, ``sample``, ``log_prob``.

Units are the same everywhere: ``xyz`` unit vectors ``(M, 3)``, ``cond`` ``(M, cond_dim)``; ``sample`` returns
unit vectors ``(B, n, 3)``; ``log_prob`` returns natural-log densities ``(M,)`` — per steradian on S² (RFM,
vMF, uniform), per unit volume in R³ (diffusion and flow matching in R³, as the paper reports them).

ODE families are *data*, not subclasses (:class:`OdeFamily` = space + path + schedule + target + prior):

=============  =========  ======================================  =========  ==================
family         space      path  x_s (s = signal level)            target     prior
=============  =========  ======================================  =========  ==================
diffusion-r3   R³         √s·x + √(1−s)·ε  (VP)                   ε          N(0, I₃)
flow-r3        R³         s·x + (1−s)·ε     (linear)              x − ε      N(0, I₃)
rfm-s2         S²         exp_ε(s·log_ε(x)) (geodesic)            dx_s/ds    uniform on S²
=============  =========  ======================================  =========  ==================

Each converts its network output to a velocity ``dx/ds`` once (:meth:`OdeFamily.velocity`); sampling and
likelihood are then the shared loops of ``solvers.py``. The baselines (:class:`VonMisesFisherFamily`,
:class:`UniformFamily`) implement the same verbs in closed form.

Training targets follow the reference exactly (§6): FM regresses the signal-space velocity ``x − ε`` without
a κ'² weight, RFM the geodesic velocity with ``mean ‖ψ − u‖²/3`` (equal to the squared Riemannian error of the
tangent part plus a penalty on the normal part), diffusion ``ε`` without SNR weighting. The condition is
replaced by zeros with probability ``cond_drop`` for guidance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig, SampleConfig
from geoloc.errors import ConfigError, InputError
from geoloc.network import GeoAdaLNMLP, NetworkConfig, VonMisesFisherNet
from geoloc.schedules import Schedule, make_schedule
from geoloc.solvers import guided, integrate, log_prob_ode, signal_grid
from geoloc.sphere import (
    UNIFORM_LOG_DENSITY,
    Euclidean,
    Sphere,
    geodesic,
    proj_tangent,
    project,
    sample_uniform,
)

__all__ = ["FAMILIES", "Family", "OdeFamily", "UniformFamily", "VonMisesFisherFamily", "make_family"]

_GAUSS_CONST = -1.5 * math.log(2 * math.pi)


def _bad_rows(mask: torch.Tensor) -> str:
    rows = torch.nonzero(mask).flatten().tolist()
    return ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")


def check_cond(cond: torch.Tensor, cond_dim: int, what: str = "cond") -> None:
    """Raise :class:`InputError` for a wrong condition width or non-finite rows (naming them)."""
    if cond.dim() != 2 or cond.shape[-1] != cond_dim:
        raise InputError(
            f"{what}: expected embeddings of shape (N, {cond_dim}), got {tuple(cond.shape)}; "
            "the store/backbone and the checkpoint do not match"
        )
    bad = ~torch.isfinite(cond).all(dim=-1)
    if bad.any():
        raise InputError(f"{what}: {int(bad.sum())} row(s) with NaN/inf values at index {_bad_rows(bad)}")


def check_xyz(xyz: torch.Tensor, what: str = "xyz") -> None:
    """Raise :class:`InputError` unless ``xyz`` is ``(N, 3)`` finite unit vectors (naming bad rows)."""
    if xyz.dim() != 2 or xyz.shape[-1] != 3:
        raise InputError(f"{what}: expected unit vectors of shape (N, 3), got {tuple(xyz.shape)}")
    bad = ~torch.isfinite(xyz).all(dim=-1) | ((xyz.norm(dim=-1) - 1).abs() > 1e-3)
    if bad.any():
        raise InputError(
            f"{what}: {int(bad.sum())} row(s) are not finite unit vectors at index {_bad_rows(bad)}; "
            "convert (lat, lon) degrees with geoloc.sphere.latlon_to_xyz after validate_latlon"
        )


class Family:
    """The interface every family implements (see the module docstring for units)."""

    name: str
    uses_guidance: bool
    trainable: bool

    def build_network(self, model: ModelConfig, cond_dim: int) -> nn.Module:
        raise NotImplementedError

    def loss(
        self,
        net: nn.Module,
        xyz: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        draws: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, n: int, generator: torch.Generator | None, device, dtype) -> dict[str, torch.Tensor]:
        """The random numbers one training step needs for ``n`` rows (drawn globally, sliced per rank)."""
        return {}

    def sample(
        self,
        net: nn.Module,
        cond: torch.Tensor,
        n: int,
        config: SampleConfig = SampleConfig(),
        generator: torch.Generator | None = None,
        trajectory: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(
        self, net: nn.Module, xyz: torch.Tensor, cond: torch.Tensor, config: LikelihoodConfig = LikelihoodConfig()
    ) -> torch.Tensor:
        raise NotImplementedError

    def point(self, net: nn.Module, cond: torch.Tensor) -> torch.Tensor | None:
        """A closed-form point estimate ``(B, 3)`` where the family has one (vMF: the mean direction)."""
        return None

    def nll_space(self) -> str:
        """``"sphere"`` (density per steradian) or ``"r3"`` (per unit volume)."""
        return "sphere"


# --------------------------------------------------------------------------------------------------------
# ODE families
# --------------------------------------------------------------------------------------------------------


@dataclass
class OdeFamily(Family):
    """Diffusion / flow matching in R³ or Riemannian flow matching on S² (see the module table)."""

    name: str
    space: Sphere | Euclidean
    path: str  # "vp" | "linear" | "geodesic"
    target: str  # "epsilon" | "velocity"
    schedule: Schedule
    cond_drop: float = 0.1
    uses_guidance: bool = True
    trainable: bool = True

    @property
    def on_sphere(self) -> bool:
        return isinstance(self.space, Sphere)

    def nll_space(self) -> str:
        return "sphere" if self.on_sphere else "r3"

    def build_network(self, model: ModelConfig, cond_dim: int) -> nn.Module:
        return GeoAdaLNMLP(NetworkConfig(model.dim, model.depth, model.expansion, cond_dim, 3))

    # --- prior ---------------------------------------------------------------------------------------
    def prior_sample(self, m: int, generator, device, dtype) -> torch.Tensor:
        if self.on_sphere:
            return sample_uniform(m, generator, dtype, device)
        return torch.randn((m, 3), generator=generator, dtype=dtype, device=device)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_sphere:
            return torch.full(x.shape[:-1], UNIFORM_LOG_DENSITY, dtype=x.dtype, device=x.device)
        return _GAUSS_CONST - 0.5 * (x * x).sum(-1)

    # --- training ------------------------------------------------------------------------------------
    def draw(self, n: int, generator, device, dtype) -> dict[str, torch.Tensor]:
        t = torch.rand(n, generator=generator, device=device, dtype=dtype)
        noise = self.prior_sample(n, generator, device, dtype)
        drop = torch.rand(n, generator=generator, device=device, dtype=dtype) < self.cond_drop
        return {"t": t, "noise": noise, "drop": drop}

    def interpolate(
        self, x1: torch.Tensor, noise: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_s, regression target)`` for data ``x1``, prior draw ``noise`` and signal levels ``s (M,)``."""
        sc = s.unsqueeze(-1)
        if self.path == "vp":
            return sc.sqrt() * x1 + (1 - sc).sqrt() * noise, noise
        if self.path == "linear":
            return sc * x1 + (1 - sc) * noise, x1 - noise
        return geodesic(noise, x1, s)

    def loss(self, net, xyz, cond, generator=None, draws=None):
        if draws is None:
            draws = self.draw(xyz.shape[0], generator, xyz.device, xyz.dtype)
        # Schedules are evaluated in float64 then cast, so s is exact near 0 and 1.
        s = self.schedule.signal(draws["t"].double()).to(xyz.dtype)
        x_s, target = self.interpolate(xyz, draws["noise"], s)
        cond = torch.where(draws["drop"].unsqueeze(-1), torch.zeros_like(cond), cond)
        out = net(x_s, s, cond)
        return ((out - target) ** 2).mean()

    # --- velocity ------------------------------------------------------------------------------------
    def velocity(
        self, net, cond: torch.Tensor, omega: float, tangent: bool = True
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``dx/ds`` as a function of ``(x (M,3), s (M,))`` for the (guided) network.

        On S² the network output is projected onto the tangent plane (``tangent=True``). The reference's
        sampler steps with the raw output and then normalises (§7.3); ``SampleConfig(retraction="project")``
        reproduces that exactly by skipping the projection.
        """
        out_fn = guided(net, cond, omega)
        if self.path == "geodesic":
            if not tangent:
                return out_fn
            return lambda x, s: proj_tangent(x, out_fn(x, s))
        if self.path == "linear":
            return out_fn
        # VP probability-flow ODE from ε-prediction: with x̂ = (x − √(1−s)ε̂)/√s,
        # dx/ds = x̂/(2√s) − ε̂/(2√(1−s)) = x/(2s) − ε̂/(2s√(1−s)).
        # reference differs: its PF-ODE omits the 1/√(1−s) score factor (§16.2).
        def vp(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            sc = s.unsqueeze(-1)
            return x / (2 * sc) - out_fn(x, s) / (2 * sc * (1 - sc).sqrt())

        return vp

    # --- sampling ------------------------------------------------------------------------------------
    def sample(self, net, cond, n, config=SampleConfig(), generator=None, trajectory=None):
        b = cond.shape[0]
        flat_cond = cond.repeat_interleave(n, dim=0)
        out = torch.empty((b * n, 3), dtype=cond.dtype, device=cond.device)
        x_all = self.prior_sample(b * n, generator, cond.device, cond.dtype)
        grid = signal_grid(self.schedule, config.steps)
        space = Sphere(config.retraction) if self.on_sphere else self.space
        for lo in range(0, b * n, config.batch_size):
            hi = min(lo + config.batch_size, b * n)
            x, c = x_all[lo:hi], flat_cond[lo:hi]
            traj = [x] if trajectory is not None else None
            if self.path == "vp":
                x = self._ddim(net, c, x, grid, config, traj)
            else:
                velocity = self.velocity(net, c, config.omega, tangent=config.retraction != "project")
                x = integrate(velocity, space, x, grid, config.method, traj)
            out[lo:hi] = project(x)
            if trajectory is not None:
                trajectory.append(torch.stack(traj, dim=1))
        return out.reshape(b, n, 3)

    def _ddim(self, net, cond, x, grid, config: SampleConfig, traj):
        """Deterministic DDIM (η = 0) with x̂ clamped to [−1, 1] (reference §7.1): Euler in DDIM coordinates."""
        if config.method not in ("euler", "ddim"):
            raise ConfigError(
                f"diffusion-r3 samples with 'ddim' (alias 'euler'); {config.method!r} is for the flow families"
            )
        eps_fn = guided(net, cond, config.omega)
        grid = grid.to(x.dtype).to(x.device)
        for k in range(len(grid) - 1):
            s, s_next = grid[k], grid[k + 1]
            eps = eps_fn(x, s.expand(x.shape[0]))
            x0 = ((x - (1 - s).sqrt() * eps) / s.sqrt()).clamp(-1.0, 1.0)
            eps = (x - s.sqrt() * x0) / (1 - s).sqrt()
            x = s_next.sqrt() * x0 + (1 - s_next).sqrt() * eps
            if traj is not None:
                traj.append(x)
        return x

    # --- likelihood ----------------------------------------------------------------------------------
    def _likelihood_problem(self, net, cond, config: LikelihoodConfig):
        """(velocity, grid from data to prior, prior log-density) of the likelihood ODE.

        Flow families integrate ``dx/ds`` in the signal level s from 1 to ~0 on the sampling grid (uniform in
        t). Diffusion integrates in the coordinates where DDIM is Euler's method, ``y = x/√s`` with noise
        level ``σ = √((1−s)/s)``, where the probability-flow ODE is ``dy/dσ = ε̂(√s·y, s)``: unlike the x-form
        (terms x/(2s) and 1/√(1−s)) it has no singularity, and the data end is σ = 0, where y = x. Time is
        τ = asinh(σ), in which both dy/dτ/|y| and the divergence stay O(1) up to the prior end; the grid is the
        sampling grid mapped to τ, with intervals longer than 0.35 split. Integration stops at σ = 100, where
        ``y = x_data + σ·ε`` is N(0, (σ² + 1/3)·I) up to O(σ⁻⁴) (E|x_data|² = 1): that Gaussian is the prior of
        the density we report, so it integrates to exactly 1 for any network.
        """
        s_grid = signal_grid(self.schedule, max(config.steps, 1)).flip(0)  # data (s = 1) → prior (s ≈ 1e-9)
        if self.path != "vp":
            return self.velocity(net, cond, config.omega), s_grid, self.prior_log_prob, self.prior_sample
        sigma_end = 100.0
        sigma = ((1 - s_grid) / s_grid).sqrt()
        sigma = torch.cat([sigma[sigma < sigma_end], sigma.new_tensor([sigma_end])])
        tau = torch.asinh(sigma)
        pieces = [tau[:1]]
        for a, b in itertools.pairwise(tau):
            k = max(1, math.ceil(float(b - a) / 0.35))
            pieces.append(torch.linspace(float(a), float(b), k + 1, dtype=tau.dtype)[1:])
        tau_grid = torch.cat(pieces)
        eps_fn = guided(net, cond, config.omega)
        var_end = sigma_end**2 + 1.0 / 3.0

        def dy_dtau(y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            ch = torch.cosh(tau).unsqueeze(-1)  # 1/√s
            return ch * eps_fn(y / ch, 1.0 / (ch * ch).squeeze(-1))

        def prior(y: torch.Tensor) -> torch.Tensor:
            return _GAUSS_CONST - 1.5 * math.log(var_end) - 0.5 * (y * y).sum(-1) / var_end

        def prior_sample(m: int, generator, device, dtype) -> torch.Tensor:
            return math.sqrt(var_end) * torch.randn((m, 3), generator=generator, device=device, dtype=dtype)

        return dy_dtau, tau_grid, prior, prior_sample

    def log_prob(self, net, xyz, cond, config=LikelihoodConfig()):
        out = torch.empty(xyz.shape[0], dtype=xyz.dtype, device=xyz.device)
        self.last_nfe = 0
        for lo in range(0, xyz.shape[0], config.batch_size):
            hi = min(lo + config.batch_size, xyz.shape[0])
            velocity, grid, prior, _ = self._likelihood_problem(net, cond[lo:hi], config)
            res = log_prob_ode(
                velocity, xyz[lo:hi], prior, grid,
                on_sphere=self.on_sphere, method=config.method, rtol=config.rtol, atol=config.atol,
            )
            out[lo:hi] = res.log_prob
            self.last_nfe += res.nfe
        return out

    def sample_exact(self, net, cond, config: LikelihoodConfig = LikelihoodConfig(), generator=None):
        """Draws ``(M, 3)``, one per row of ``cond``, from exactly the density :meth:`log_prob` reports.

        The likelihood ODE run forward from its own prior on the same grid with the same fixed-step solver
        (``dopri5`` falls back to ``rk4``). Not projected: in R³ the density lives off the sphere. Used where a
        sample and its log-density must agree: Monte-Carlo entropy (localizability) and density checks.
        """
        velocity, grid, _, prior_sample = self._likelihood_problem(net, cond, config)
        x = prior_sample(cond.shape[0], generator, cond.device, cond.dtype)
        method = "rk4" if config.method == "dopri5" else config.method
        space = Sphere() if self.on_sphere else Euclidean()
        return integrate(velocity, space, x, grid.flip(0), method)


# --------------------------------------------------------------------------------------------------------
# Closed-form baselines
# --------------------------------------------------------------------------------------------------------


def vmf_log_density(x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """log f(x; μ, κ) on S², stable for all κ > 0: log κ − log 2π − log(1 − e^{−2κ}) + κ(μ·x − 1)."""
    return (
        torch.log(kappa) - math.log(2 * math.pi) - torch.log(-torch.expm1(-2 * kappa)) + kappa * ((mu * x).sum(-1) - 1)
    )


def vmf_sample(mu: torch.Tensor, kappa: torch.Tensor, generator=None) -> torch.Tensor:
    """Exact vMF draws on S² for ``mu (M, 3)``, ``kappa (M,)``: inverse CDF of w = μ·x, uniform azimuth.

    w = 1 + log(u + (1 − u)e^{−2κ})/κ, computed with logaddexp so it is exact for tiny and huge κ.
    (The reference uses Wood's rejection sampler; for S² the inverse CDF is closed-form.)
    """
    m = mu.shape[0]
    u = torch.rand(m, generator=generator, device=mu.device, dtype=mu.dtype).clamp_min(1e-12)
    w = 1 + torch.logaddexp(torch.log(u), torch.log1p(-u) - 2 * kappa) / kappa
    w = w.clamp(-1.0, 1.0)
    e1 = project(proj_tangent(mu, torch.randn(m, 3, generator=generator, device=mu.device, dtype=mu.dtype)))
    return project(w.unsqueeze(-1) * mu + (1 - w * w).clamp_min(0).sqrt().unsqueeze(-1) * e1)


@dataclass
class VonMisesFisherFamily(Family):
    """A vMF (``components = 1``) or a K-component vMF mixture whose parameters a network predicts.

    # reference differs: the mixture likelihood uses log-sum-exp (the reference sums raw densities and
    # underflows, §16.10), and the point estimate is the mean direction of the heaviest component instead of
    # a random draw (§16.11; ``sample`` still draws).
    """

    name: str = "vmf"
    components: int = 1
    uses_guidance: bool = False
    trainable: bool = True

    def build_network(self, model: ModelConfig, cond_dim: int) -> nn.Module:
        return VonMisesFisherNet(NetworkConfig(model.dim, model.depth, model.expansion, cond_dim, 3), self.components)

    def _mixture_log_prob(self, net, xyz, cond):
        mu, kappa, log_w = net(cond)
        comp = vmf_log_density(xyz.unsqueeze(1), mu, kappa)
        return torch.logsumexp(log_w + comp, dim=-1)

    def loss(self, net, xyz, cond, generator=None, draws=None):
        return -self._mixture_log_prob(net, xyz, cond).mean()

    def sample(self, net, cond, n, config=SampleConfig(), generator=None, trajectory=None):
        mu, kappa, log_w = net(cond)
        b = cond.shape[0]
        idx = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)  # (B, n)
        mu_s = torch.gather(mu, 1, idx.unsqueeze(-1).expand(b, n, 3)).reshape(-1, 3)
        kappa_s = torch.gather(kappa, 1, idx).reshape(-1)
        return vmf_sample(mu_s, kappa_s, generator).reshape(b, n, 3)

    def log_prob(self, net, xyz, cond, config=LikelihoodConfig()):
        return self._mixture_log_prob(net, xyz, cond)

    def point(self, net, cond):
        mu, _, log_w = net(cond)
        best = log_w.argmax(dim=-1)
        return mu[torch.arange(mu.shape[0]), best]


class _NoParameters(nn.Module):
    def forward(self, *args):  # pragma: no cover - never called
        raise RuntimeError("the uniform family has no network")


@dataclass
class UniformFamily(Family):
    """The uniform distribution on S² (the paper's "Random" row): −log 4π everywhere."""

    name: str = "uniform"
    trainable: bool = False

    def build_network(self, model: ModelConfig, cond_dim: int) -> nn.Module:
        return _NoParameters()

    def loss(self, net, xyz, cond, generator=None, draws=None):
        return torch.zeros((), dtype=xyz.dtype, device=xyz.device)

    def sample(self, net, cond, n, config=SampleConfig(), generator=None, trajectory=None):
        return sample_uniform((cond.shape[0], n), generator, cond.dtype, cond.device)

    def log_prob(self, net, xyz, cond, config=LikelihoodConfig()):
        return torch.full((xyz.shape[0],), UNIFORM_LOG_DENSITY, dtype=xyz.dtype, device=xyz.device)


def _ode(name: str, space, path: str, target: str):
    def build(cfg: FamilyConfig) -> OdeFamily:
        return OdeFamily(
            name=name,
            space=space,
            path=path,
            target=target,
            schedule=make_schedule(cfg.schedule, cfg.schedule_params),
            cond_drop=cfg.cond_drop,
        )

    return build


FAMILIES: dict[str, Callable[[FamilyConfig], Family]] = {
    "diffusion-r3": _ode("diffusion-r3", Euclidean(), "vp", "epsilon"),
    "flow-r3": _ode("flow-r3", Euclidean(), "linear", "velocity"),
    "rfm-s2": _ode("rfm-s2", Sphere(), "geodesic", "velocity"),
    "vmf": lambda cfg: VonMisesFisherFamily(name="vmf", components=1),
    "vmf-mix": lambda cfg: VonMisesFisherFamily(name="vmf-mix", components=cfg.components),
    "uniform": lambda cfg: UniformFamily(),
}


def make_family(cfg: FamilyConfig) -> Family:
    """Build a family from its config (``cfg.name`` is a key of :data:`FAMILIES`)."""
    if cfg.name not in FAMILIES:
        raise ConfigError(f"unknown family {cfg.name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.name](cfg)
