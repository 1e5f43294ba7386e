"""The generative families behind one interface: ``loss``, ``sample``, ``log_prob``.

Units are the same everywhere: ``xyz`` unit vectors ``(M, 3)``, ``cond`` ``(M, cond_dim)``; ``sample`` returns
unit vectors ``(B, n, 3)``; ``log_prob`` returns natural-log densities ``(M,)`` — per steradian on S² (RFM,
vMF, uniform), per unit volume in R³ (diffusion and flow matching in R³, as the paper reports them).

ODE families are *data*, not subclasses: :class:`OdeFamily` = a path object (``geoloc/paths.py``) + a
schedule.

=============  =========  ============================================  =========  ==================
family         space      path  (s = signal level)                      target     prior
=============  =========  ============================================  =========  ==================
diffusion-r3   R³         ``VPPath``: √s·x + √(1−s)·ε                   ε          N(0, I₃)
flow-r3        R³         ``LinearPath``: s·x + (1−s)·ε                 x − ε      N(0, I₃)
rfm-s2         S²         ``GeodesicPath``: exp_ε(s·log_ε(x))           dx_s/ds    uniform on S²
=============  =========  ============================================  =========  ==================

The path owns its prior, interpolation, target, the output → velocity conversion and its sampler (DDIM for
VP); :meth:`OdeFamily.network_output` is the one place the network is called when sampling, and the
integration loops are the shared ones of ``solvers.py``. The baselines (:class:`VonMisesFisherFamily`,
:class:`UniformFamily`) implement the same verbs in closed form.

Training targets follow the reference exactly (docs/reference-behaviour.md §6): FM regresses the signal-space
velocity ``x − ε`` without a κ'² weight, RFM the geodesic velocity with ``mean ‖ψ − u‖²/3`` (equal to the
squared Riemannian error of the tangent part plus a penalty on the normal part), diffusion ``ε`` without SNR
weighting. The condition is replaced by zeros with probability ``cond_drop`` for guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig, SampleConfig
from geoloc.errors import ConfigError, InputError
from geoloc.network import GeoAdaLNMLP, NetworkConfig, VonMisesFisherNet
from geoloc.paths import GeodesicPath, LikelihoodProblem, LinearPath, Path, PathSample, VPPath
from geoloc.schedules import Schedule, make_schedule
from geoloc.solvers import guided, integrate, log_prob_ode, signal_grid
from geoloc.sphere import UNIFORM_LOG_DENSITY, Euclidean, Sphere, proj_tangent, project, sample_uniform

__all__ = ["FAMILIES", "Family", "OdeFamily", "UniformFamily", "VonMisesFisherFamily", "make_family"]


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
        self,
        net: nn.Module,
        xyz: torch.Tensor,
        cond: torch.Tensor,
        config: LikelihoodConfig = LikelihoodConfig(),
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
    """Diffusion / flow matching in R³ or Riemannian flow matching on S²: a :class:`~geoloc.paths.Path` and a
    :class:`~geoloc.schedules.Schedule` (see the module table).

    Everything that differs between the three lives in the path; this class only wires it to the network
    (:meth:`network_output`, the one place the network is called) and to the shared loops of ``solvers.py``.
    """

    name: str
    path: Path
    schedule: Schedule
    cond_drop: float = 0.1
    uses_guidance: bool = True
    trainable: bool = True

    @property
    def space(self) -> Sphere | Euclidean:
        return self.path.space

    @property
    def target(self) -> str:
        """What the network predicts: ``"epsilon"`` (VP) or ``"velocity"``."""
        return self.path.target

    @property
    def on_sphere(self) -> bool:
        return self.path.on_sphere

    def nll_space(self) -> str:
        return "sphere" if self.on_sphere else "r3"

    def build_network(self, model: ModelConfig, cond_dim: int) -> nn.Module:
        return GeoAdaLNMLP(NetworkConfig(model.dim, model.depth, model.expansion, cond_dim, 3))

    # --- prior ---------------------------------------------------------------------------------------
    def prior_sample(self, m: int, generator, device, dtype) -> torch.Tensor:
        return self.path.prior_sample(m, generator, device, dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.path.prior_log_prob(x)

    # --- training ------------------------------------------------------------------------------------
    def draw(self, n: int, generator, device, dtype) -> dict[str, torch.Tensor]:
        t = torch.rand(n, generator=generator, device=device, dtype=dtype)
        noise = self.prior_sample(n, generator, device, dtype)
        drop = torch.rand(n, generator=generator, device=device, dtype=dtype) < self.cond_drop
        return {"t": t, "noise": noise, "drop": drop}

    def interpolate(self, x1: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> PathSample:
        """``x_s`` and the regression target for data ``x1``, prior draw ``noise``, levels ``s (M,)``."""
        return self.path.interpolate(noise, x1, s)

    def loss(self, net, xyz, cond, generator=None, draws=None):
        if draws is None:
            draws = self.draw(xyz.shape[0], generator, xyz.device, xyz.dtype)
        # Schedules are evaluated in float64 then cast, so s is exact near 0 and 1.
        s = self.schedule.signal(draws["t"].double()).to(xyz.dtype)
        ps = self.interpolate(xyz, draws["noise"], s)
        cond = torch.where(draws["drop"].unsqueeze(-1), torch.zeros_like(cond), cond)
        out = net(ps.x, s, cond)
        return ((out - ps.target) ** 2).mean()

    # --- the network, and the velocity ---------------------------------------------------------------
    def network_output(
        self, net, cond: torch.Tensor, omega: float
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The (guided) network output as a function of ``(x (M,3), s (M,))``: the one place that calls the
        network when sampling or computing likelihoods (a per-condition cache hooks in here)."""
        return guided(net, cond, omega)

    def velocity(
        self, net, cond: torch.Tensor, omega: float, tangent: bool = True
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``dx/ds`` as a function of ``(x (M,3), s (M,))`` for the (guided) network.

        On S² the network output is projected onto the tangent plane (``tangent=True``). The reference's
        sampler steps with the raw output and then normalises (docs/reference-behaviour.md §7.3);
        ``SampleConfig(retraction="project")`` reproduces that exactly by skipping the projection.
        """
        out_fn = self.network_output(net, cond, omega)
        return lambda x, s: self.path.to_velocity(out_fn(x, s), x, s, tangent)

    # --- sampling ------------------------------------------------------------------------------------
    def sample(self, net, cond, n, config=SampleConfig(), generator=None, trajectory=None):
        b = cond.shape[0]
        flat_cond = cond.repeat_interleave(n, dim=0)
        out = torch.empty((b * n, 3), dtype=cond.dtype, device=cond.device)
        x_all = self.prior_sample(b * n, generator, cond.device, cond.dtype)
        grid = signal_grid(self.schedule, config.steps)
        for lo in range(0, b * n, config.batch_size):
            hi = min(lo + config.batch_size, b * n)
            x, c = x_all[lo:hi], flat_cond[lo:hi]
            traj = [x] if trajectory is not None else None
            out_fn = self.network_output(net, c, config.omega)
            x = self.path.solve(out_fn, x, grid, config.method, config.retraction, traj)
            out[lo:hi] = project(x)
            if trajectory is not None:
                trajectory.append(torch.stack(traj, dim=1))
        return out.reshape(b, n, 3)

    # --- likelihood ----------------------------------------------------------------------------------
    def _likelihood_problem(self, net, cond, config: LikelihoodConfig) -> LikelihoodProblem:
        """The likelihood ODE (field, grid from data to prior, prior density and sampler).

        Flow paths integrate ``dx/ds`` in the signal level s from 1 to ~0 on the sampling grid (uniform in t);
        the VP path integrates in DDIM's coordinates (:meth:`geoloc.paths.VPPath.likelihood_problem`).
        """
        s_grid = signal_grid(self.schedule, max(config.steps, 1)).flip(0)  # data (s = 1) → prior (s ≈ 1e-9)
        return self.path.likelihood_problem(self.network_output(net, cond, config.omega), s_grid)

    def log_prob(self, net, xyz, cond, config=LikelihoodConfig()):
        out = torch.empty(xyz.shape[0], dtype=xyz.dtype, device=xyz.device)
        self.last_nfe = 0
        for lo in range(0, xyz.shape[0], config.batch_size):
            hi = min(lo + config.batch_size, xyz.shape[0])
            problem = self._likelihood_problem(net, cond[lo:hi], config)
            res = log_prob_ode(
                problem.field,
                xyz[lo:hi],
                problem.prior_log_prob,
                problem.grid,
                on_sphere=self.on_sphere,
                method=config.method,
                rtol=config.rtol,
                atol=config.atol,
            )
            out[lo:hi] = res.log_prob
            self.last_nfe += res.nfe
        return out

    def sample_exact(self, net, cond, config: LikelihoodConfig = LikelihoodConfig(), generator=None):
        """Draws ``(M, 3)``, one per row of ``cond``, from exactly the density :meth:`log_prob` reports.

        The likelihood ODE run forward from its own prior on the same grid with the same fixed-step solver
        (``dopri5`` falls back to ``rk4``). Not projected: in R³ the density lives off the sphere. Used where
        a sample and its log-density must agree: Monte-Carlo entropy (localizability) and density checks.
        """
        problem = self._likelihood_problem(net, cond, config)
        x = problem.prior_sample(cond.shape[0], generator, cond.device, cond.dtype)
        method = "rk4" if config.method == "dopri5" else config.method
        space = Sphere() if self.on_sphere else Euclidean()
        return integrate(problem.field, space, x, problem.grid.flip(0), method)


# --------------------------------------------------------------------------------------------------------
# Closed-form baselines
# --------------------------------------------------------------------------------------------------------


def vmf_log_density(x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """log f(x; μ, κ) on S², stable for all κ > 0: log κ − log 2π − log(1 − e^{−2κ}) + κ(μ·x − 1)."""
    return (
        torch.log(kappa)
        - math.log(2 * math.pi)
        - torch.log(-torch.expm1(-2 * kappa))
        + kappa * ((mu * x).sum(-1) - 1)
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
    # underflows, docs/reference-behaviour.md §16.10), and the point estimate is the mean direction of the
    # heaviest component instead of a random draw (docs/reference-behaviour.md §16.11; ``sample`` still
    # draws).
    """

    name: str = "vmf"
    components: int = 1
    uses_guidance: bool = False
    trainable: bool = True

    def build_network(self, model: ModelConfig, cond_dim: int) -> nn.Module:
        return VonMisesFisherNet(
            NetworkConfig(model.dim, model.depth, model.expansion, cond_dim, 3), self.components
        )

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


def _ode(name: str, path: Path) -> Callable[[FamilyConfig], OdeFamily]:
    def build(cfg: FamilyConfig) -> OdeFamily:
        return OdeFamily(
            name=name,
            path=path,
            schedule=make_schedule(cfg.schedule, cfg.schedule_params),
            cond_drop=cfg.cond_drop,
        )

    return build


FAMILIES: dict[str, Callable[[FamilyConfig], Family]] = {
    "diffusion-r3": _ode("diffusion-r3", VPPath()),
    "flow-r3": _ode("flow-r3", LinearPath()),
    "rfm-s2": _ode("rfm-s2", GeodesicPath()),
    "vmf": lambda cfg: VonMisesFisherFamily(name="vmf", components=1),
    "vmf-mix": lambda cfg: VonMisesFisherFamily(name="vmf-mix", components=cfg.components),
    "uniform": lambda cfg: UniformFamily(),
}


def make_family(cfg: FamilyConfig) -> Family:
    """Build a family from its config (``cfg.name`` is a key of :data:`FAMILIES`)."""
    if cfg.name not in FAMILIES:
        raise ConfigError(f"unknown family {cfg.name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.name](cfg)
