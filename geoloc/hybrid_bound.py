"""A hybrid with one batch's neighbours found once, speaking the :class:`~geoloc.geolocator.Geolocator` verbs.

Why: code written for a flow (:func:`geoloc.density.density_maps`, the maps of ``geoloc predict``) calls
``geo.log_prob(xyz, cond_rows, likelihood_config)`` with one condition row per point — thousands of rows,
each a copy of one of the batch's few conditions. A :class:`~geoloc.hybrid.HybridGeolocator` would search
the neighbour index once per row, and its third argument is the neighbours, not the ODE settings.
:class:`BoundHybrid` searches once per batch (:meth:`~geoloc.hybrid.HybridGeolocator.neighbours`), maps each
row back to its item by exact equality, and keeps every verb exact: the flow's part is computed with the
likelihood settings the caller asks for (a map that doubles its ODE steps gets them), the neighbours' part
is closed form. Tensors in, tensors out: no file is opened here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geoloc.config import LikelihoodConfig
from geoloc.errors import InputError
from geoloc.hybrid import HybridGeolocator, Neighbours, mixture_log_prob
from geoloc.sphere import latlon_to_xyz, project, xyz_to_latlon

__all__ = ["BoundHybrid", "bind_batch"]


class BoundHybrid:
    """``hybrid`` restricted to the conditions ``cond (B, D)``, whose ``neighbours`` are searched once.

    ``log_prob`` and ``sample`` accept any rows that are copies of those B conditions (in any order and
    number), like a :class:`~geoloc.geolocator.Geolocator`'s; ``family``, ``likelihood_config`` and
    ``sample_config`` are the flow's / the hybrid's, so ODE-aware callers treat it as the flow they wrap.
    """

    def __init__(
        self,
        hybrid: HybridGeolocator,
        cond: Tensor,
        neighbours: Neighbours | None = None,
        flow_resolution: int | None = None,
    ) -> None:
        self.hybrid = hybrid
        self.cond = hybrid._cond(cond)
        self.nb = hybrid._nb(self.cond, neighbours)
        if flow_resolution is not None and not 0 <= flow_resolution <= 15:
            raise InputError(f"flow_resolution must be an H3 resolution 0..15, got {flow_resolution}")
        self.flow_resolution = flow_resolution
        self._flow_cells: dict[tuple[str, int, int, str], float] = {}

    @property
    def cond_dim(self) -> int:
        return self.hybrid.cond_dim

    @property
    def device(self) -> torch.device:
        return self.hybrid.device

    @property
    def family(self) -> Any:
        return self.hybrid.flow.family

    @property
    def likelihood_config(self) -> LikelihoodConfig:
        return self.hybrid.likelihood_config

    @property
    def sample_config(self) -> Any:
        return self.hybrid.flow.sample_config

    def items_of(self, cond: Tensor) -> Tensor:
        """The item (row of the bound batch) each row of ``cond (M, D)`` is a copy of: ``(M,)``."""
        c = self.hybrid._cond(cond)
        same = torch.zeros((c.shape[0], self.cond.shape[0]), dtype=torch.bool, device=c.device)
        for lo in range(0, c.shape[0], 4096):  # (chunk, B, D) comparisons stay small
            same[lo : lo + 4096] = (c[lo : lo + 4096, None, :] == self.cond[None]).all(-1)
        found = same.any(1)
        if not bool(found.all()):
            raise InputError(
                f"{int((~found).sum())} condition row(s) are not among the {self.cond.shape[0]} this hybrid "
                "was bound to; bind the batch they come from"
            )
        return same.to(torch.int8).argmax(1)

    @torch.no_grad()
    def log_prob(self, xyz: Tensor, cond: Tensor, config: LikelihoodConfig | None = None) -> Tensor:
        """Exact log-density ``(M,)`` (nats per steradian) of one point per condition row (or one row
        broadcast); the flow's part with ``config`` (default: the hybrid's likelihood settings)."""
        c = self.hybrid._cond(cond)
        x = project(torch.as_tensor(xyz, dtype=torch.float32).to(self.device))
        if c.shape[0] == 1 and x.shape[0] != 1:
            c = c.expand(x.shape[0], -1)
        if c.shape[0] != x.shape[0]:
            raise InputError(f"log_prob: {x.shape[0]} points but {c.shape[0]} conditions")
        items = self.items_of(c)
        nb = self.nb.rows(items)
        lik = config or self.likelihood_config
        if self.flow_resolution is None:
            flow_lp = self.hybrid.flow.log_prob(x, c, lik)
        else:
            flow_lp = self._flow_on_cells(x, items, lik)
        return mixture_log_prob(flow_lp.unsqueeze(1), x.unsqueeze(1), nb, self.hybrid.params)[:, 0]

    def _flow_on_cells(self, x: Tensor, items: Tensor, lik: LikelihoodConfig) -> Tensor:
        """The flow's log-density at the centre of each point's H3 cell of ``flow_resolution``, one ODE
        solve per (item, cell), remembered across calls.

        Why: a density map refines its cells down to the neighbours' kernels (tens of km at a fitted κ of
        ~10⁴), and the flow's exact log-density costs an ODE solve with a divergence per cell — ~6,000 solves
        a map. The flow part is smooth on that scale, so holding it constant on coarser cells (resolution 3:
        ~12,000 km²) leaves the kernels exact and costs a few times fewer solves; the map's mass check (within
        1 %) still tests the result. Maps only: ``log_prob`` without ``flow_resolution`` stays exact.
        """
        import h3  # maps only; the H3 binding is imported where cells are made

        ll = xyz_to_latlon(x.to(torch.float64)).cpu().numpy()
        res = int(self.flow_resolution)
        tag = f"{lik.method}:{lik.steps}:{lik.rtol}:{lik.atol}"
        keys = [
            (tag, res, int(i), h3.latlng_to_cell(float(a), float(o), res))
            for i, (a, o) in zip(items.tolist(), ll, strict=True)
        ]
        todo = [k for k in dict.fromkeys(keys) if k not in self._flow_cells]
        if todo:
            centres = torch.tensor([h3.cell_to_latlng(k[3]) for k in todo], dtype=torch.float64)
            pts = latlon_to_xyz(centres).to(device=self.device, dtype=torch.float32)
            rows = self.cond[torch.tensor([k[2] for k in todo], device=self.cond.device)]
            lp = self.hybrid.flow.log_prob(pts, rows, lik)
            self._flow_cells.update(zip(todo, lp.double().cpu().tolist(), strict=True))
        return torch.tensor([self._flow_cells[k] for k in keys], dtype=torch.float32, device=x.device)

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        n: int = 1,
        *,
        omega: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        trajectory: list[Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """``n`` hybrid draws per row ``(M, n, 3)`` (flow part from its sampler). With ``trajectory`` (the
        denoising paths a map overlays), the draws are the flow's own: only the flow has paths."""
        c = self.hybrid._cond(cond)
        if trajectory is not None:
            return self.hybrid.flow.sample(
                c, n, omega=omega, steps=steps, generator=generator, trajectory=trajectory, **kwargs
            )
        nb = self.nb.rows(self.items_of(c))
        return self.hybrid.sample(
            c,
            n,
            exact=False,
            steps=steps,
            omega=0.0 if omega is None else omega,
            generator=generator,
            neighbours=nb,
        )


def bind_batch(geo: Any, cond: Tensor, flow_resolution: int | None = None) -> Any:
    """``geo`` itself for a plain geolocator; for a hybrid, a :class:`BoundHybrid` on ``cond`` (with the
    flow part on cells of ``flow_resolution``, for maps)."""
    if isinstance(geo, HybridGeolocator):
        return BoundHybrid(geo, cond, flow_resolution=flow_resolution)
    return geo
