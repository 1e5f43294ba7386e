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
from geoloc.sphere import project

__all__ = ["BoundHybrid", "bind_batch"]


class BoundHybrid:
    """``hybrid`` restricted to the conditions ``cond (B, D)``, whose ``neighbours`` are searched once.

    ``log_prob`` and ``sample`` accept any rows that are copies of those B conditions (in any order and
    number), like a :class:`~geoloc.geolocator.Geolocator`'s; ``family``, ``likelihood_config`` and
    ``sample_config`` are the flow's / the hybrid's, so ODE-aware callers treat it as the flow they wrap.
    """

    def __init__(self, hybrid: HybridGeolocator, cond: Tensor, neighbours: Neighbours | None = None) -> None:
        self.hybrid = hybrid
        self.cond = hybrid._cond(cond)
        self.nb = hybrid._nb(self.cond, neighbours)

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
        nb = self.nb.rows(self.items_of(c))
        flow_lp = self.hybrid.flow.log_prob(x, c, config or self.likelihood_config)
        return mixture_log_prob(flow_lp.unsqueeze(1), x.unsqueeze(1), nb, self.hybrid.params)[:, 0]

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


def bind_batch(geo: Any, cond: Tensor) -> Any:
    """``geo`` itself for a plain geolocator; for a hybrid, a :class:`BoundHybrid` on ``cond``."""
    return BoundHybrid(geo, cond) if isinstance(geo, HybridGeolocator) else geo
