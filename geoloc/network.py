"""The conditional networks: the AdaLN-MLP of the reference and the von Mises–Fisher heads.

:class:`GeoAdaLNMLP` follows docs/reference-behaviour.md §4 exactly, down to the parameter names, so that a
published PLONK ``model.safetensors`` loads into it without renaming (docs/reference-behaviour.md §12.1): a
sinusoidal embedding of ``1000·s`` (the signal level), standardised per sample, then an MLP; the condition
mapped by one Linear and added to it; ``depth`` residual blocks ``h + g ⊙ MLP((1 + a) ⊙ LN(h) + b)`` whose
(a, b, g) come from the condition; a final AdaLN and a Linear back to 3-D. The last Linear of every block MLP
starts at zero, so every block starts as the identity. At dim 512 / depth 12 / expansion 4 / cond 1024 this
is 36,034,563 parameters.

The vMF networks (docs/reference-behaviour.md §13) share the block and replace time and input with a learned
register vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdaLNBlock",
    "CondCache",
    "GeoAdaLNMLP",
    "NetworkConfig",
    "VonMisesFisherNet",
    "count_parameters",
    "quantize_dynamic_int8",
]


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
    """[cos(s·f), sin(s·f)] with f_i = 10000^(−2i/C), standardised per sample (unbiased std).

    As docs/reference-behaviour.md §4.1 describes it.
    """

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


@dataclass
class CondCache:
    """Condition-only work of :meth:`GeoAdaLNMLP.forward_guided`, done once per sampling call, not per step.

    ``cond_proj`` is ``cond_mapper`` of each *distinct* condition (U, D); ``inverse`` (M,) maps every row to
    its distinct condition, or is None when the M rows are all distinct. Samplers and likelihoods repeat one
    condition over many points (n draws per item, thousands of map cells), and the AdaLN modulation of a row
    depends only on its condition and the step's signal level: computed per row it is ~40 % of a forward pass
    at any width (38·D² of the ~134·D² multiply-adds per row), computed per condition it is nearly free.
    ``null_proj`` is the mapper of the all-zeros token (its bias, 1 × D); ``mod_weight``/``mod_bias`` every
    AdaLN modulation Linear (the blocks' (a, b, g) then the final (a, b)) stacked into one matrix: all of
    them read the same ``SiLU(c)``, so one GEMM replaces 13.
    """

    cond_proj: torch.Tensor
    null_proj: torch.Tensor
    mod_weight: torch.Tensor
    mod_bias: torch.Tensor
    inverse: torch.Tensor | None = None


class GeoAdaLNMLP(nn.Module):
    """ψ(x, s, c): a 3-vector (velocity or noise, by family) for a point x at signal level s, condition c.

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
        h = self._map_input(x)
        for block in self.blocks:
            h = block(h, c)
        scale, shift = self.final_adaln(c).chunk(2, dim=-1)
        return self._map_output((1 + scale) * self.final_norm(h) + shift)

    def _map_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input mapping in fp32 even under bf16 autocast, so the residual stream starts (and, since
        ``h + g ⊙ MLP(·)`` promotes to fp32, stays) fp32.

        # reference differs: under autocast its Linear casts x to bf16, an 8-bit mantissa: a grid of 2^-8 rad
        # ≈ 25 km for coordinates with |x| ≥ 0.5, so points 1-10 km apart become the same input.
        # The cost is one 3 × D Linear and a fp32 residual add per block; fp32 runs are unchanged.
        """
        with torch.autocast(x.device.type, enabled=False):
            return self.initial_mapper(x.float())

    def _map_output(self, u: torch.Tensor) -> torch.Tensor:
        """The last Linear (D → 3) in fp32 under autocast too: a bf16 velocity carries 0.4 % relative error
        into every solver step. # reference differs: bf16 under autocast; fp32 runs are unchanged."""
        with torch.autocast(u.device.type, enabled=False):
            return self.final_linear(u.float())

    # --- inference fast path ------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, cond: torch.Tensor) -> CondCache:
        """The condition-only work for ``cond (M, cond_dim)``: reuse it for every step of one sampling run.

        Repeated rows (the same condition for many points) are found once here, by exact equality, so the
        per-step modulations are computed once per distinct condition (:class:`CondCache`).
        """
        ada = [block.ada_map[1] for block in self.blocks] + [self.final_adaln[1]]
        w = torch.cat([lin.weight for lin in ada]).to(cond.dtype)
        b = torch.cat([lin.bias for lin in ada]).to(cond.dtype)
        null = self.cond_mapper.bias.to(cond.dtype).unsqueeze(0)
        distinct, inverse = cond, None
        if cond.shape[0] > 1:
            found, rows = torch.unique(cond, dim=0, return_inverse=True)
            if found.shape[0] < cond.shape[0]:
                distinct, inverse = found, rows
        return CondCache(
            cond_proj=self.cond_mapper(distinct), null_proj=null, mod_weight=w, mod_bias=b, inverse=inverse
        )

    def _time(self, s: torch.Tensor) -> torch.Tensor:
        """Time embedding, computed on one row when every row has the same s (a sampler's step)."""
        if s.numel() > 1 and bool((s == s[0]).all()):
            return self.time_embedder(s[:1])
        return self.time_embedder(s)

    def _modulations(self, c: torch.Tensor, cache: CondCache) -> list[torch.Tensor]:
        """[(1 + a), b, g] per block then [(1 + a), b] for the final AdaLN, from one GEMM on SiLU(c)."""
        return self._split_modulations(F.linear(F.silu(c), cache.mod_weight, cache.mod_bias))

    def _split_modulations(self, mods: torch.Tensor) -> list[torch.Tensor]:
        d = self.config.dim
        parts = list(mods.split(d, dim=-1))
        for k in range(0, len(parts), 1):
            # Every block's chunk 0 and the final chunk 0 are scales: store 1 + a once.
            if (k < 3 * len(self.blocks) and k % 3 == 0) or k == 3 * len(self.blocks):
                parts[k] = parts[k] + 1
        return parts

    def _row_modulations(self, temb: torch.Tensor, cache: CondCache) -> list[torch.Tensor]:
        """The conditional branch's modulations, one row per point: computed per distinct condition and
        gathered to the rows when the step shares one signal level (``temb`` is 1 × D), per row otherwise."""
        proj, rows = cache.cond_proj, cache.inverse
        if rows is None:
            return self._modulations(proj + temb, cache)
        if temb.shape[0] != 1:  # per-row levels: the (condition, level) pairs are distinct again
            return self._modulations(proj.index_select(0, rows) + temb, cache)
        mods = F.linear(F.silu(proj + temb), cache.mod_weight, cache.mod_bias)
        return self._split_modulations(mods.index_select(0, rows))

    @torch.no_grad()
    def forward_guided(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        cond: torch.Tensor,
        omega: float,
        cache: CondCache | None = None,
    ) -> torch.Tensor:
        """The classifier-free-guided output ``(1+ω)·ψ(x, s, c) − ω·ψ(x, s, ∅)`` in one pass, for inference.

        Same numbers as two calls of :meth:`forward` (within fp32 rounding) with less work: the condition
        mapping comes from ``cache`` (:meth:`prepare`, once per sampling run); the time embedding is
        computed once when all rows share s; the null branch's modulation is computed for ONE row and
        broadcast (its condition is the same zero vector for every row); all AdaLN modulations come from
        one stacked GEMM; the two branches share the input mapping and run the block MLPs as one batch.
        # reference differs: it runs the network twice on the concatenated batch
        # (docs/reference-behaviour.md §7.3); same field.
        """
        if cache is None:
            cache = self.prepare(cond)
        n = x.shape[0]
        temb = self._time(s)
        mods_c = self._row_modulations(temb, cache)
        h0 = self._map_input(x)
        if omega == 0:
            return self._run(h0, [mods_c])
        mods_u = self._modulations(cache.null_proj + temb, cache)
        out = self._run(torch.cat([h0, h0]), [mods_c, mods_u])
        c, u = out[:n], out[n:]
        return (1.0 + omega) * c - omega * u

    def forward_cached(
        self, x: torch.Tensor, s: torch.Tensor, omega: float, cache: CondCache
    ) -> torch.Tensor:
        """:meth:`forward_guided`'s field, differentiable in ``x`` (the likelihood's exact divergence).

        The modulations come from ``cache`` without autograd: gradients reach ``x``, never the parameters, so
        this is for frozen networks only (:func:`geoloc.solvers.guided` checks). Out-of-place, unlike
        :meth:`_run`, so autograd can record it.
        """
        temb = self._time(s)
        with torch.no_grad():
            mods = [self._row_modulations(temb, cache)]
            if omega != 0:
                mods.append(self._modulations(cache.null_proj + temb, cache))
        h0 = self._map_input(x)
        outs = [self._run_differentiable(h0, m) for m in mods]
        if omega == 0:
            return outs[0]
        return (1.0 + omega) * outs[0] - omega * outs[1]

    def _run_differentiable(self, h: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        d = self.config.dim
        for i, block in enumerate(self.blocks):
            u = torch.addcmul(mods[3 * i + 1], F.layer_norm(h, (d,), eps=1e-5), mods[3 * i])
            h = torch.addcmul(h, block.mlp(u), mods[3 * i + 2])
        k = 3 * len(self.blocks)
        return self._map_output(torch.addcmul(mods[k + 1], F.layer_norm(h, (d,), eps=1e-5), mods[k]))

    def _run(self, h: torch.Tensor, mods: list[list[torch.Tensor]]) -> torch.Tensor:
        """Blocks on ``h`` made of ``len(mods)`` equal row groups, group g modulated by ``mods[g]``."""
        groups = len(mods)
        d = self.config.dim
        hv = h.view(groups, -1, d)
        for i, block in enumerate(self.blocks):
            normed = F.layer_norm(h, (d,), eps=1e-5).view(groups, -1, d)
            u = torch.empty_like(normed)
            for g in range(groups):
                scale, shift = mods[g][3 * i], mods[g][3 * i + 1]
                torch.addcmul(shift, normed[g], scale, out=u[g])
            m = block.mlp[3](F.gelu(block.mlp[0](u.view(-1, d)))).view(groups, -1, d)
            for g in range(groups):
                hv[g].addcmul_(m[g], mods[g][3 * i + 2])
        k = 3 * len(self.blocks)
        normed = F.layer_norm(h, (d,), eps=1e-5).view(groups, -1, d)
        u = torch.empty_like(normed)
        for g in range(groups):
            torch.addcmul(mods[g][k + 1], normed[g], mods[g][k], out=u[g])
        return self._map_output(u.view(-1, d))


def quantize_dynamic_int8(net: GeoAdaLNMLP) -> GeoAdaLNMLP:
    """A copy of ``net`` whose block-MLP Linears are int8 with dynamic activation quantisation (CPU only).

    fbgemm runs these on AVX2 without native int8 dot products; the block MLPs are ~75 % of the
    multiply-adds. Modulation, mappers and the output stay fp32. For sampling only, never for training or
    the likelihood (no gradients through quantised Linears). Quality must be checked on the known-density
    bench before use (bench/bench_speed.py ``int8`` rows).
    """
    import copy

    # Lazy: torch.ao.quantization is deprecated in newer torch and is only needed for this opt-in path.
    from torch.ao.quantization import quantize_dynamic

    out = copy.deepcopy(net).eval()
    for block in out.blocks:
        block.mlp = quantize_dynamic(block.mlp, {nn.Linear}, dtype=torch.qint8)
    return out


def _fused_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class VonMisesFisherNet(nn.Module):
    """Condition → parameters of a K-component vMF mixture (K = 1: one vMF), docs/reference-behaviour.md §13.

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
