"""A conditional distribution on S² with a known density, for tests that a trained model recovers it.

Class c ∈ {0..K-1} is embedded as a fixed random unit vector (plus small noise) in R^D; given c, the location
is a mixture of von Mises–Fisher components with known means, concentrations and weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from geoloc.families import vmf_log_density, vmf_sample
from geoloc.sphere import latlon_to_xyz


@dataclass
class VmfMixtureTask:
    centres: torch.Tensor  # (K, C, 3)
    kappa: torch.Tensor  # (K, C)
    log_w: torch.Tensor  # (K, C)
    class_emb: torch.Tensor  # (K, D)

    @classmethod
    def default(cls, dim: int = 8, seed: int = 0, kappa: float = 60.0) -> VmfMixtureTask:
        g = torch.Generator().manual_seed(seed)
        centres = latlon_to_xyz(
            torch.tensor(
                [
                    [[48.85, 2.35], [-33.87, 151.21]],  # Paris / Sydney
                    [[40.71, -74.0], [35.68, 139.69]],  # New York / Tokyo
                    [[-23.55, -46.63], [-1.29, 36.82]],  # São Paulo / Nairobi
                    [[64.1, -21.9], [-54.8, -68.3]],  # Reykjavik / Ushuaia
                ]
            )
        )
        k = centres.shape[0]
        w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.8, 0.2], [0.6, 0.4]])
        emb = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=-1) * 3
        return cls(centres, torch.full((k, 2), kappa), w.log(), emb)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cond (n, D), xyz (n, 3), class (n,))."""
        k = self.centres.shape[0]
        cls_ = torch.randint(0, k, (n,), generator=generator)
        comp = torch.multinomial(self.log_w.exp()[cls_], 1, generator=generator).squeeze(-1)
        mu = self.centres[cls_, comp]
        xyz = vmf_sample(mu, self.kappa[cls_, comp], generator)
        return self.class_emb[cls_], xyz, cls_

    def log_prob(self, xyz: torch.Tensor, cls_: torch.Tensor) -> torch.Tensor:
        comp = vmf_log_density(xyz.unsqueeze(1), self.centres[cls_], self.kappa[cls_])
        return torch.logsumexp(self.log_w[cls_] + comp, dim=-1)

    def nll_bits_per_dim(self, xyz: torch.Tensor, cls_: torch.Tensor) -> float:
        return float(-self.log_prob(xyz, cls_).mean() / (3 * math.log(2)))
