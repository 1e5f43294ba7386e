"""The conditional networks: the AdaLN-MLP of the reference and the von Mises–Fisher heads.

:class:`GeoAdaLNMLP` follows docs/reference-behaviour.md §4 exactly, down to the parameter names, so that a published PLONK
``model.safetensors`` loads into it without renaming (docs/reference-behaviour.md §12.1): a sinusoidal embedding of ``1000·s`` (the
signal level), standardised per sample, then an MLP; the condition mapped by one Linear and added to it;
``depth`` residual blocks ``h + g ⊙ MLP((1 + a) ⊙ LN(h) + b)`` whose (a, b, g) come from the condition; a
final AdaLN and a Linear back to 3-D. The last Linear of every block MLP starts at zero, so every block
starts as the identity. At dim 512 / depth 12 / expansion 4 / cond 1024 this is 36,034,563 parameters.

The vMF networks (docs/reference-behaviour.md §13) share the block and replace time and input with a learned register vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AdaLNBlock", "GeoAdaLNMLP", "NetworkConfig", "VonMisesFisherNet", "count_parameters"]


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture hyper-parameters (the reference's names)."""

    dim: int = 512
    depth: int = 12
    expansion: int = 4
    cond_dim: int = 1024
    input_dim: int = 3


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _SinusoidalEncoding(nn.Module):
    """[cos(s·f), sin(s·f)] with f_i = 10000^(−2i/C), standardised per sample (unbiased std, docs/reference-behaviour.md §4.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        freqs = torch.exp(-math.log(10000.0) * 2.0 * torch.arange(half, dtype=torch.float32) / channels)
        self.register_buffer("freqs", freqs)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        arg = s.unsqueeze(-1) * self.freqs
        feats = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
        return (feats - feats.mean(-1, keepdim=True)) / feats.std(-1, keepdim=True)


class _TimeEmbedder(nn.Module):
    def __init__(self, dim: int, scale: float = 1000.0) -> None:
        super().__init__()
        channels = dim // 4
        self.scale = scale
        self.encode_time = _SinusoidalEncoding(channels)
        self.map_time = nn.Sequential(nn.Linear(channels, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.map_time(self.encode_time(self.scale * s))


class AdaLNBlock(nn.Module):
    """h ← h + g ⊙ MLP((1 + a) ⊙ LN(h) + b), with (a, b, g) = Linear(SiLU(c)) split in that order."""

    def __init__(self, dim: int, expansion: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-5)
        self.ada_map = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.mlp = nn.Sequential(
            nn.Linear(dim, expansion * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(expansion * dim, dim)
        )
        nn.init.zeros_(self.mlp[3].weight)
        nn.init.zeros_(self.mlp[3].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift, gate = self.ada_map(c).chunk(3, dim=-1)
        return h + gate * self.mlp((1 + scale) * self.norm(h) + shift)


class _FinalAdaLN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-5)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada(c).chunk(2, dim=-1)
        return (1 + scale) * self.norm(h) + shift


class GeoAdaLNMLP(nn.Module):
    """ψ(x, s, c): a 3-vector (velocity or noise, by family) for a point x at signal level s under condition c.

    Shapes: ``x (B, 3)``, ``s (B,)`` in [0, 1], ``cond (B, cond_dim)`` → ``(B, 3)``. The all-zeros condition
    is the unconditional ("null") token used by classifier-free guidance (docs/reference-behaviour.md §4.1).
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.time_embedder = _TimeEmbedder(d)
        self.cond_mapper = nn.Linear(config.cond_dim, d)
        self.initial_mapper = nn.Linear(config.input_dim, d)
        self.blocks = nn.ModuleList([AdaLNBlock(d, config.expansion) for _ in range(config.depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-5)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final_linear = nn.Linear(d, config.input_dim)

    def forward(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = self.cond_mapper(cond) + self.time_embedder(s)
        h = self.initial_mapper(x)
        for block in self.blocks:
            h = block(h, c)
        scale, shift = self.final_adaln(c).chunk(2, dim=-1)
        return self.final_linear((1 + scale) * self.final_norm(h) + shift)


def _fused_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class VonMisesFisherNet(nn.Module):
    """Condition → parameters of a K-component vMF mixture (K = 1: a single vMF), docs/reference-behaviour.md §13.

    A learned register vector is the initial state; ``depth`` AdaLN blocks conditioned on Linear(cond) (no
    time), a final AdaLN, then heads. Returns ``(mu (B, K, 3) unit, kappa (B, K) > 0, log_w (B, K))``.
    """

    def __init__(self, config: NetworkConfig, components: int = 1) -> None:
        super().__init__()
        self.config = config
        self.components = components
        d = config.dim
        self.register = nn.Parameter(torch.empty(d))
        nn.init.trunc_normal_(self.register, std=0.02, a=-0.04, b=0.04)
        self.cond_mapper = nn.Linear(config.cond_dim, d)
        self.blocks = nn.ModuleList([AdaLNBlock(d, config.expansion) for _ in range(config.depth)])
        self._final = _FinalAdaLN(d)
        self.mu_head = nn.Sequential(_fused_mlp(d), nn.Linear(d, 3 * components))
        self.kappa_head = nn.Sequential(_fused_mlp(d), nn.Linear(d, components))
        self.weight_head = nn.Sequential(_fused_mlp(d), nn.Linear(d, components)) if components > 1 else None

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.cond_mapper(cond)
        h = self.register.expand(cond.shape[0], -1)
        for block in self.blocks:
            h = block(h, c)
        h = self._final(h, c)
        mu = self.mu_head(h).reshape(-1, self.components, 3)
        mu = mu / mu.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kappa = nn.functional.softplus(self.kappa_head(h)) + 1e-6
        if self.weight_head is None:
            log_w = torch.zeros_like(kappa)
        else:
            log_w = torch.log_softmax(self.weight_head(h), dim=-1)
        return mu, kappa, log_w
