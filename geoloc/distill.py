"""Guidance in one pass: a student network distilled to reproduce the classifier-free-guided field.

Guided sampling (the paper's one guided draw, ω = 2) evaluates ``(1+ω)·ψ(x, s, c) − ω·ψ(x, s, ∅)`` at every
solver step: two branches, twice the multiply-adds of an unguided step even when they share condition work
(``GeoAdaLNMLP.forward_guided``). A *student* with the teacher's architecture, started from the teacher's
weights, is trained so that ONE pass ``ψ_student(x, s, c)`` equals that guided output at a fixed ω. Sampling
at that ω then costs one branch per step.

What is distilled, and where (:func:`distillation_points`):
- **The field, not the samples**: the loss is ``mean ‖ψ_student − ψ_guided‖² / 3`` on the raw network output
  at the same (x, s, c), the scale of the training loss. On S² this is the squared error of the tangent part
  (what the default ``exp`` sampler uses) plus that of the normal part (which the reference's ``project``
  step also moves along), so one student serves both retractions. Matching the output rather than the
  velocity also keeps the diffusion family's ε-prediction free of the 1/s factors of its velocity.
- **Where the sampler goes**: a guided sampler does not stay on the training path's marginals (guidance
  sharpens them), so half of each batch (``trajectory_fraction``) is the states the teacher's own guided
  Euler sampler visits, at the signal levels of its grid for each NFE in ``sampler_steps``; the targets
  there are the guided outputs the sampler computed anyway (recorded, not recomputed). The other half is the
  training path's interpolants between prior noise and data at ``s = schedule(t)``, ``t ~ U(0, 1)``: every
  level the schedule uses, near where the student's own trajectories (which drift slightly from the
  teacher's) pass, and where the teacher's field is accurate because it was trained there. Measured on the
  4-class test task (tests/test_distill.py, 200 steps): guided draws from the same noise landed a median
  55 / 51 / 52 km (90th percentile 161 / 157 / 147 km) from the teacher's at 8 / 16 / 32 NFE with the mix,
  62 / 53 / 51 km (174 / 176 / 172 km) with interpolants alone: a small gain, largest at few steps.
- **Conditions from the training embeddings**, never the null token: at c = ∅ the guided field is the
  unguided one, which the teacher keeps providing.

:class:`GuidanceDistilled` is what a distilled checkpoint loads into: the teacher AND the student. It samples
with the student only at exactly the distilled ω and under ``torch.no_grad`` (sampling); any other ω —
including ω = 0, which the best-answer estimators, top-k modes and localizability use — and every
likelihood (autograd) run the teacher, so they give the teacher's numbers, not approximations. The price is
a checkpoint twice the size (``student.safetensors`` next to the teacher's ``model.safetensors``; a reader
without distillation support simply sees the teacher). Opt-in: nothing distils unless asked
(``geoloc distill``).

# reference differs: the reference has no distillation; at ω = the distilled value our one-pass sampler
# follows the student's field, a measured approximation of the reference's two-branch field
# (bench/bench_speed.py ``distilled_quality``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from geoloc.config import DistillConfig, OptimConfig, SampleConfig
from geoloc.errors import ConfigError, TrainingError
from geoloc.families import Family, OdeFamily, check_cond, check_xyz
from geoloc.network import CondCache, GeoAdaLNMLP
from geoloc.progress import progress_bar
from geoloc.solvers import signal_grid
from geoloc.train import _make_optimizer, lr_at

__all__ = [
    "DistillResult",
    "DistilledCache",
    "GuidanceDistilled",
    "distill",
    "distillation_points",
    "field_error",
]


@dataclass
class DistilledCache:
    """Per-sampling-call condition work of :class:`GuidanceDistilled`, made for whichever net runs."""

    cond: torch.Tensor
    teacher: CondCache | None = None
    student: CondCache | None = None


class GuidanceDistilled(nn.Module):
    """A teacher ``GeoAdaLNMLP`` and its one-pass guidance student for guidance ``omega``.

    ``forward`` (training, likelihood, unguided calls) is the teacher's. ``forward_guided`` (the sampler's
    fast path, ``solvers.guided``) runs the student in one pass when asked for exactly ``omega`` and the
    teacher's two-branch field otherwise, so no ω ever gets a silently approximated field.
    """

    def __init__(self, teacher: GeoAdaLNMLP, student: nn.Module, omega: float) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.omega = float(omega)

    @property
    def config(self):
        return self.teacher.config

    def forward(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.teacher(x, s, cond)

    def prepare(self, cond: torch.Tensor) -> DistilledCache:
        return DistilledCache(cond)

    @torch.no_grad()
    def forward_guided(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        cond: torch.Tensor,
        omega: float,
        cache: DistilledCache | None = None,
    ) -> torch.Tensor:
        """The guided output: one student pass at the distilled ω, the teacher's two branches otherwise."""
        if cache is None:
            cache = self.prepare(cond)
        if float(omega) == self.omega:
            if cache.student is None:
                cache.student = self.student.prepare(cond)
            return self.student.forward_guided(x, s, cond, 0.0, cache.student)
        if cache.teacher is None:
            cache.teacher = self.teacher.prepare(cond)
        return self.teacher.forward_guided(x, s, cond, omega, cache.teacher)

    def forward_cached(
        self, x: torch.Tensor, s: torch.Tensor, omega: float, cache: DistilledCache
    ) -> torch.Tensor:
        """The likelihood's path (differentiable in ``x``, :func:`geoloc.solvers.guided`): always the
        teacher's field, at every ω, so log-densities are the teacher's exactly."""
        if cache.teacher is None:
            cache.teacher = self.teacher.prepare(cache.cond)
        return self.teacher.forward_cached(x, s, omega, cache.teacher)


@dataclass
class DistillResult:
    """The trained student (eval mode, no gradients), the loss curve, and the held-out field error.

    ``field_error_*``: relative RMS error ‖ψ_student − ψ_guided‖ / ‖ψ_guided‖ over the held-out points,
    before (the student is the teacher's conditional branch) and after distillation.
    """

    student: GeoAdaLNMLP
    history: list[dict[str, float]] = field(default_factory=list)
    field_error_before: float = math.nan
    field_error_after: float = math.nan

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "field_error_before": self.field_error_before,
            "field_error_after": self.field_error_after,
            "final_loss": last.get("loss", math.nan),
        }


def _ode_family(family: Family) -> OdeFamily:
    if not isinstance(family, OdeFamily) or not family.uses_guidance:
        raise ConfigError(
            f"family {family.name!r} has no guided sampler to distil; distillation is for rfm-s2, flow-r3 "
            "and diffusion-r3 checkpoints"
        )
    return family


@torch.no_grad()
def distillation_points(
    teacher: nn.Module,
    family: Family,
    cond: torch.Tensor,
    xyz: torch.Tensor,
    omega: float,
    *,
    trajectory_fraction: float = 0.5,
    sampler_steps: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, s, c, target)`` for one distillation batch built from ``cond (B, D)`` and ``xyz (B, 3)``.

    ``round(B · trajectory_fraction)`` rows are states of the teacher's guided Euler sampler with
    ``sampler_steps`` steps (from fresh prior noise, for the first ⌈rows / steps⌉ conditions, a random
    subset of the visited states), with the guided outputs it computed there as targets; the rest are
    interpolants of the training path at ``s = schedule(t)``, ``t ~ U(0, 1)`` with their guided outputs.
    Random numbers come from ``generator`` on the CPU (the same on every device).
    """
    fam = _ode_family(family)
    dev, dtype = cond.device, cond.dtype
    b = cond.shape[0]
    n_traj = round(b * trajectory_fraction)
    xs, ss, cs, ys = [], [], [], []
    if n_traj > 0:
        m = min(b, math.ceil(n_traj / sampler_steps))
        c = cond[:m]
        x0 = fam.prior_sample(m, generator, "cpu", dtype).to(dev)
        out_fn = fam.network_output(teacher, c, omega)
        seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def record(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            y = out_fn(x, s)
            seen.append((x, s, y))
            return y

        grid = signal_grid(fam.schedule, sampler_steps)
        fam.path.solve(record, x0, grid, "euler", SampleConfig().retraction)
        pick = torch.randperm(len(seen) * m, generator=generator)[:n_traj].to(dev)
        xs.append(torch.cat([v[0] for v in seen])[pick])
        ss.append(torch.cat([v[1] for v in seen])[pick])
        ys.append(torch.cat([v[2] for v in seen])[pick])
        cs.append(c.repeat(len(seen), 1)[pick])
    k = b - n_traj
    if k > 0:
        c, x1 = cond[n_traj:], xyz[n_traj:]
        t = torch.rand(k, generator=generator, dtype=torch.float64)
        s = fam.schedule.signal(t).to(dtype).to(dev)  # float64 then cast, as the training loss does
        noise = fam.prior_sample(k, generator, "cpu", dtype).to(dev)
        x = fam.interpolate(x1, noise, s).x
        xs.append(x)
        ss.append(s)
        cs.append(c)
        ys.append(fam.network_output(teacher, c, omega)(x, s))
    return torch.cat(xs), torch.cat(ss), torch.cat(cs), torch.cat(ys)


@torch.no_grad()
def field_error(
    student: nn.Module, points: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
) -> float:
    """Relative RMS error ‖ψ_student(x, s, c) − target‖ / ‖target‖ over ``points``
    (from :func:`distillation_points`)."""
    x, s, c, target = points
    err = student(x, s, c) - target
    return float(err.pow(2).sum().sqrt() / target.pow(2).sum().sqrt().clamp_min(1e-12))


def distill(
    teacher: GeoAdaLNMLP,
    family: Family,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: DistillConfig = DistillConfig(),
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
) -> DistillResult:
    """Train a one-pass student of ``teacher``'s guided field at ``config.omega``.

    Args:
        teacher: the trained network (left unchanged; its device is the student's).
        family: the teacher's ODE family (its path, schedule and prior decide the points).
        batches: yields ``(cond (B, D), xyz (B, 3))`` training pairs (``config.batch_size`` rows are used
            from each); the locations only feed the interpolant half.
        val: held-out ``(cond, xyz)`` for :attr:`DistillResult.field_error_before` / ``_after`` (points drawn
            once with a fixed seed, so before and after see the same points).

    AdamW (no weight decay: the student should stay near the teacher it starts from), linear warm-up and
    cosine decay (``train.lr_at``), gradient clipping; no EMA (the learning rate decays to 0 and the run is
    short). A non-finite loss raises :class:`TrainingError`.
    """
    fam = _ode_family(family)
    if isinstance(teacher, GuidanceDistilled):
        raise ConfigError("this network is already guidance-distilled; distil its teacher instead")
    if not isinstance(teacher, GeoAdaLNMLP):
        raise ConfigError(f"distillation needs a GeoAdaLNMLP teacher, got {type(teacher).__name__}")
    device = next(teacher.parameters()).device
    teacher = teacher.eval()
    student = copy.deepcopy(teacher).train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = _make_optimizer(student, OptimConfig(name="adamw", lr=config.lr, weight_decay=0.0))
    gen = torch.Generator().manual_seed(config.seed)

    def points(cond: torch.Tensor, xyz: torch.Tensor, g: torch.Generator, steps: int):
        return distillation_points(
            teacher,
            fam,
            cond.to(device),
            xyz.to(device),
            config.omega,
            trajectory_fraction=config.trajectory_fraction,
            sampler_steps=steps,
            generator=g,
        )

    result = DistillResult(student=student)
    val_points = None
    if val is not None:
        vc, vx = val[0][: config.val_points].float(), val[1][: config.val_points].float()
        check_cond(vc, teacher.config.cond_dim, "distillation validation")
        check_xyz(vx, "distillation validation coordinates")
        mid = config.sampler_steps[len(config.sampler_steps) // 2]
        val_points = points(vc, vx, torch.Generator().manual_seed(config.seed + 1), mid)
        result.field_error_before = field_error(student, val_points)

    it = iter(batches)
    bar = progress_bar(config.steps, f"distil ω={config.omega:g}", unit="step", enabled=progress)
    try:
        for step in range(config.steps):
            cond, xyz = next(it)
            cond, xyz = cond[: config.batch_size].float(), xyz[: config.batch_size].float()
            if step == 0:
                check_cond(cond, teacher.config.cond_dim, "distillation batch")
                check_xyz(xyz, "distillation batch coordinates")
            lr = lr_at(step, config.lr, config.warmup_steps, config.steps)
            for grp in opt.param_groups:
                grp["lr"] = lr
            steps = config.sampler_steps[step % len(config.sampler_steps)]
            x, s, c, target = points(cond, xyz, gen, steps)
            loss = ((student(x, s, c) - target) ** 2).mean()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"non-finite distillation loss ({value}) at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            opt.step()
            result.history.append({"step": step + 1, "loss": value, "lr": lr})
            bar.update(1)
            if (step + 1) % 50 == 0:
                bar.set_postfix({"loss": f"{value:.4g}"})
    finally:
        bar.close()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    if val_points is not None:
        result.field_error_after = field_error(student, val_points)
    return result
