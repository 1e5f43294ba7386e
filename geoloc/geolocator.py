"""``Geolocator``: a trained network + its family, with the verbs users want on embeddings.

It is what a checkpoint directory loads into (``Geolocator.from_pretrained(dir)``) and what ``geoloc eval``
and ``geoloc predict`` use: ``sample``, ``log_prob``, ``localizability`` and ``predict`` (a point estimate,
the top-k distinct places with their probability mass, and optionally the localizability).

Point estimates (``estimator=``), each optimal for a different metric:
- ``geoscore`` (the default of ``predict`` and of ``geoloc predict``): the draw maximising the expected
  GeoScore under the model — the best answer the model can give (issue 13);
- ``sample``: one guided draw with ω = 2 — the paper's protocol (Table 1), which stays ``geoloc eval``'s
  default for comparability; vMF families use their mean direction instead (# reference differs: it
  reports a random vMF draw, docs/reference-behaviour.md §16.11);
- ``median`` (mean km), ``mode`` (small-radius accuracy), ``mean``, ``best-of-n`` (the reference's
  "swarm": the most likely of n unguided draws): see ``estimators.py``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoloc.checkpoint import load_into, load_weights, read_config, save_checkpoint
from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig, SampleConfig, apply_overrides
from geoloc.distill import GuidanceDistilled
from geoloc.errors import CheckpointError, ConfigError
from geoloc.families import Family, OdeFamily, check_cond, check_xyz, make_family
from geoloc.sphere import angle, xyz_to_latlon

__all__ = ["Geolocator", "Prediction"]


@dataclass
class Prediction:
    """Per-item results of :meth:`Geolocator.predict` (B items).

    ``latlon (B, 2)`` degrees and ``xyz (B, 3)``: the point estimate; ``topk``: an ``estimators.TopK`` (modes
    with probability mass) or None; ``localizability (B,)`` in bits (negative entropy, higher = more
    localizable) or None; ``samples (B, n, 3)`` when kept.

    The estimate and the modes can disagree (a guided draw lands where the unguided distribution has
    little mass; a GeoScore-optimal point sits between two basins), so the answer says which:
    ``estimate_mode (B,)``: the index (0..k−1) of the top-k mode whose basin holds the estimate and within
    whose draws it lies, −1 when it lies outside every reported mode (None without top-k); ``estimate_kind``:
    what the point is — ``"guided-sample"`` (one draw with guidance ω ≠ 0, the paper's protocol: not a draw
    from the distribution the modes describe), ``"sample"`` (one unguided draw), ``"mean-direction"`` (vMF
    families' closed form), or the estimator's name over the model's draws (``"median"``, ``"geoscore"``, …),
    prefixed ``"guided-"`` when those draws were guided. ``estimate_omega``: the guidance behind it (0: none).
    """

    latlon: torch.Tensor
    xyz: torch.Tensor
    topk: Any = None
    localizability: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    estimate_mode: torch.Tensor | None = None
    estimate_kind: str = ""
    estimate_omega: float = 0.0


def _within_reach(mode: torch.Tensor, point: torch.Tensor, samples: torch.Tensor, topk: Any) -> torch.Tensor:
    """Keep a mode index ``(B,)`` only where the point lies no farther from that mode than the mode's own
    farthest sample; −1 otherwise.

    Mean-shift from anywhere ends in some basin (far from every sample, the nearest one pulls), so the basin
    alone would call a mean direction 1,700 km out over the Atlantic "in" a 45-km-wide Paris mode. An
    estimate is in mode i only if it is in i's basin *and* among the draws that make mode i up.
    """
    idx = mode.clamp_min(0)
    centre = torch.nan_to_num(topk.xyz.to(samples.dtype)).gather(1, idx[:, None, None].expand(-1, 1, 3))
    spread = angle(centre, samples)  # (B, n): each draw's distance from the candidate mode
    reach = torch.where(topk.assignment == idx[:, None], spread, torch.zeros_like(spread)).amax(dim=1)
    inside = angle(centre[:, 0], point.to(samples.dtype)) <= reach * (1 + 1e-6) + 1e-9
    return torch.where((mode >= 0) & inside, mode, torch.full_like(mode, -1))


def _with_student(teacher: nn.Module, directory: str | Path, distilled: Any, arch: str) -> GuidanceDistilled:
    """The teacher with the student of ``directory/student.safetensors`` (same architecture)."""
    try:
        omega = float(distilled["omega"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}/config.json: 'distilled' needs a numeric 'omega' ({e})") from e
    student = copy.deepcopy(teacher)
    load_into(student, load_weights(directory, student=True), f"{directory} (student)", arch)
    return GuidanceDistilled(teacher, student.eval(), omega)


class Geolocator:
    """A conditional distribution on S² given an embedding."""

    def __init__(
        self,
        net: nn.Module,
        family: Family,
        cond_dim: int,
        config: dict[str, Any] | None = None,
        sample_config: SampleConfig = SampleConfig(),
        likelihood_config: LikelihoodConfig = LikelihoodConfig(),
    ) -> None:
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.family = family
        self.cond_dim = cond_dim
        self.config = config or {}
        self.sample_config = sample_config
        self.likelihood_config = likelihood_config

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def build(cls, family: FamilyConfig, model: ModelConfig, cond_dim: int, **kwargs: Any) -> Geolocator:
        fam = make_family(family)
        return cls(fam.build_network(model, cond_dim), fam, cond_dim, **kwargs)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", raw: bool = False
    ) -> Geolocator:
        """Load a checkpoint directory (EMA weights unless ``raw``).

        A guidance-distilled checkpoint (config.json ``"distilled"``) loads as a
        :class:`~geoloc.distill.GuidanceDistilled`: the teacher plus its one-pass student for that ω.
        """
        cfg = read_config(directory)
        try:
            family_cfg = apply_overrides(FamilyConfig(), cfg["family"])
            model_cfg = apply_overrides(ModelConfig(), cfg["model"])
            cond_dim = int(cfg["cond_dim"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{directory}/config.json: missing or bad field {e}") from e
        except ConfigError as e:
            raise CheckpointError(f"{directory}/config.json: {e}") from e
        try:
            geo = cls.build(family_cfg, model_cfg, cond_dim, config=cfg)
        except (RuntimeError, ValueError) as e:  # e.g. a negative width: torch's message, first line only
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{directory}/config.json: cannot build its architecture ({first})") from e
        if geo.family.trainable:
            arch = ", ".join(f"{k}={v}" for k, v in cfg["model"].items()) + f", cond_dim={cond_dim}"
            load_into(geo.net, load_weights(directory, raw=raw), str(directory), arch)
            if cfg.get("distilled"):
                geo.net = _with_student(geo.net, directory, cfg["distilled"], arch)
        geo.net.to(device)
        return geo

    def save_pretrained(self, directory: str | Path) -> Path:
        cfg = dict(self.config)
        cfg.setdefault("cond_dim", self.cond_dim)
        if isinstance(self.net, GuidanceDistilled):
            student = self.net.student.state_dict()
            return save_checkpoint(directory, self.net.teacher.state_dict(), cfg, student_weights=student)
        return save_checkpoint(directory, self.net.state_dict(), cfg)

    @property
    def device(self) -> torch.device:
        for p in self.net.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def backbone(self) -> dict[str, Any]:
        return dict(self.config.get("backbone") or {})

    def _cond(self, cond: torch.Tensor) -> torch.Tensor:
        cond = torch.as_tensor(cond, dtype=torch.float32).to(self.device)
        if cond.dim() == 1:
            cond = cond.unsqueeze(0)
        check_cond(cond, self.cond_dim)
        return cond

    # --- verbs ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        n: int = 1,
        *,
        omega: float | None = None,
        steps: int | None = None,
        method: str | None = None,
        generator: torch.Generator | None = None,
        trajectory: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``n`` draws per item: unit vectors ``(B, n, 3)``. Defaults come from ``sample_config``."""
        cfg = self.sample_config
        cfg = replace(
            cfg,
            omega=cfg.omega if omega is None else omega,
            steps=cfg.steps if steps is None else steps,
            method=cfg.method if method is None else method,
        )
        return self.family.sample(self.net, self._cond(cond), n, cfg, generator, trajectory)

    @torch.no_grad()
    def log_prob(
        self, xyz: torch.Tensor, cond: torch.Tensor, config: LikelihoodConfig | None = None
    ) -> torch.Tensor:
        """Exact log-density (nats per steradian on S², per unit volume for R³ families) ``(M,)``.

        ``cond`` is ``(M, D)`` or a single ``(D,)``/``(1, D)`` row broadcast to every point.
        """
        cond = self._cond(cond)
        xyz = torch.as_tensor(xyz, dtype=torch.float32).to(self.device)
        check_xyz(xyz)
        if cond.shape[0] == 1 and xyz.shape[0] != 1:
            cond = cond.expand(xyz.shape[0], -1)
        if cond.shape[0] != xyz.shape[0]:
            raise ConfigError(f"log_prob: {xyz.shape[0]} points but {cond.shape[0]} conditions")
        return self.family.log_prob(self.net, xyz, cond, config or self.likelihood_config)

    @torch.no_grad()
    def sample_with_log_prob(
        self, cond: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` exact draws per item and their exact log-densities: ``((B, n, 3), (B, n))``.

        Exact: for ODE families the draws come from the likelihood ODE run forward, so each log-density is
        that of the density the draw came from (what localizability and region areas need). Same signature
        as :meth:`geoloc.hybrid.HybridGeolocator.sample_with_log_prob`.
        """
        cond = self._cond(cond)
        b = cond.shape[0]
        flat = cond.repeat_interleave(n, dim=0)
        if isinstance(self.family, OdeFamily):
            x = self.family.sample_exact(self.net, flat, self.likelihood_config, generator)
        else:
            x = self.family.sample(self.net, cond, n, self.sample_config, generator).reshape(-1, 3)
        lp = self.family.log_prob(self.net, x, flat, self.likelihood_config)
        return x.reshape(b, n, 3), lp.reshape(b, n)

    @torch.no_grad()
    def localizability(
        self, cond: torch.Tensor, n: int = 256, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Negative entropy E_p[log₂ p] in bits per item ``(B,)``, Monte-Carlo with exact log-densities.

        Samples come from exactly the density whose log we take (the likelihood ODE run forward), so the
        estimate is unbiased up to discretisation. # reference differs: its pipeline divides by an extra 4π
        (docs/reference-behaviour.md §9.3, §15.8). For R³ families the density is per unit volume, so values
        are not comparable with S².
        """
        _, lp = self.sample_with_log_prob(cond, n, generator)
        return lp.mean(-1) / math.log(2)

    @torch.no_grad()
    def predict(
        self,
        cond: torch.Tensor,
        *,
        estimator: str = "geoscore",
        n: int = 256,
        omega: float | None = None,
        top_k: int = 0,
        localizability: bool = False,
        keep_samples: bool = False,
        generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> Prediction:
        """Point estimate per item, plus optional top-k modes (from ``n`` unguided draws) and localizability.

        Default: ``geoscore``, the draw that maximises the expected GeoScore (the best answer; issue 13).
        ``estimator="sample"`` draws one sample with guidance ``omega`` (default 2, the paper's protocol,
        ``geoloc eval``'s default); the others use ``n`` draws with ``omega`` (default 0, the model's own
        distribution). ``steps``: sampler steps (None: ``sample_config``'s). With top-k, the estimate is
        placed in the basin of one of the modes or outside them (``Prediction.estimate_mode``).
        """
        from geoloc.estimators import ESTIMATORS, basin_of, top_k_modes

        cond = self._cond(cond)
        samples = None
        if estimator == "sample":
            point = self.family.point(self.net, cond)
            w = 0.0
            kind = "mean-direction"
            if point is None:
                w = 2.0 if omega is None else float(omega)
                point = self.sample(cond, 1, omega=w, steps=steps, generator=generator)[:, 0]
                kind = "guided-sample" if w != 0.0 else "sample"
        elif estimator in ESTIMATORS:
            w = 0.0 if omega is None else float(omega)
            kind = f"guided-{estimator}" if w != 0.0 else estimator
            samples = self.sample(cond, n, omega=w, steps=steps, generator=generator)
            lp = None
            if ESTIMATORS[estimator].log_prob == "required":
                flat = samples.reshape(-1, 3)
                lp = self.log_prob(flat, cond.repeat_interleave(n, dim=0)).reshape(samples.shape[:2])
            point = ESTIMATORS[estimator](samples, lp)
        else:
            raise ConfigError(
                f"unknown estimator {estimator!r}; choose 'sample' or one of {sorted(ESTIMATORS)}"
            )
        topk = None
        if top_k > 0:
            if samples is None or (omega not in (None, 0.0) and estimator != "sample"):
                samples = self.sample(cond, n, omega=0.0, steps=steps, generator=generator)
            topk = top_k_modes(samples, k=top_k)
            # Which reported mode (if any) the estimate belongs to: the same KDE climb as the modes'.
            estimate_mode = _within_reach(
                basin_of(point[:, None].to(samples.dtype), samples, topk)[:, 0], point, samples, topk
            )
        else:
            estimate_mode = None
        loc = self.localizability(cond, n=min(n, 256), generator=generator) if localizability else None
        return Prediction(
            latlon=xyz_to_latlon(point),
            xyz=point,
            topk=topk,
            localizability=loc,
            samples=samples if keep_samples else None,
            estimate_mode=estimate_mode,
            estimate_kind=kind,
            estimate_omega=w,
        )
