"""The guided fast path gives the two-pass field: same numbers within fp32 rounding, on real code paths."""

from __future__ import annotations

import torch

from geoloc.network import GeoAdaLNMLP, NetworkConfig
from geoloc.solvers import guided


def _net(dim: int = 64, depth: int = 3, cond_dim: int = 32) -> GeoAdaLNMLP:
    torch.manual_seed(0)
    net = GeoAdaLNMLP(NetworkConfig(dim=dim, depth=depth, cond_dim=cond_dim)).eval()
    with torch.no_grad():  # make the zero-initialised block outputs non-zero so every block matters
        for block in net.blocks:
            block.mlp[3].weight.normal_(0, 0.05)
            block.mlp[3].bias.normal_(0, 0.05)
    return net


def _two_pass(net, x, s, cond, omega):
    out = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([cond, torch.zeros_like(cond)]))
    c, u = out.chunk(2)
    return (1 + omega) * c - omega * u


def test_forward_guided_matches_two_forward_passes():
    net = _net()
    x = torch.nn.functional.normalize(torch.randn(17, 3), dim=-1)
    cond = torch.randn(17, 32)
    for s in (torch.full((17,), 0.37), torch.rand(17)):  # shared step signal, and per-row signal
        for omega in (0.0, 2.0):
            with torch.no_grad():
                want = _two_pass(net, x, s, cond, omega) if omega else net(x, s, cond)
                got = net.forward_guided(x, s, cond, omega, net.prepare(cond))
            assert want.abs().max() > 0.1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_guided_uses_fast_path_only_without_autograd():
    net = _net()
    x = torch.nn.functional.normalize(torch.randn(9, 3), dim=-1).requires_grad_(True)
    s, cond = torch.full((9,), 0.5), torch.randn(9, 32)
    field = guided(net, cond, 2.0)
    with torch.no_grad():
        fast = field(x, s)
    slow = field(x, s)  # grad enabled: the likelihood's path, differentiable in x
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(slow.sum(), x)
    assert grad.abs().max() > 0


def _reference_lamb_rule(params, grads_per_step, groups_wd, lr, betas, eps):
    """The reference optimiser's update (docs/reference-behaviour.md §11.2), written from its description:
    Adam moments with bias correction, L2 weight decay added to the step, trust ratio ‖w‖/‖step‖ only where
    weight decay > 0."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            step = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            wd = groups_wd[i]
            trust = torch.tensor(1.0)
            if wd > 0:
                step = step + wd * p
                w_norm, s_norm = p.norm(), step.norm()
                if w_norm > 0 and s_norm > 0:
                    trust = w_norm / s_norm
            params[i] = p - lr * trust * step
    return params


def test_paper_preset_lamb_matches_reference_rule_for_100_steps():
    from geoloc.presets import get_preset
    from geoloc.train import _make_optimizer

    optim = get_preset("osv5m-rfm-s2").optim
    assert optim.name == "lamb"
    net = _net(dim=16, depth=2, cond_dim=8).double()
    start = [p.detach().clone() for p in net.parameters()]
    wd = [optim.weight_decay if p.dim() >= 2 else 0.0 for p in net.parameters()]
    opt = _make_optimizer(net, optim)
    for g in opt.param_groups:
        g["lr"] = optim.lr
    gen = torch.Generator().manual_seed(3)
    grads_per_step = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in start] for _ in range(100)]
    for grads in grads_per_step:
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
    want = _reference_lamb_rule(list(start), grads_per_step, wd, optim.lr, optim.betas, 1e-8)
    moved = max(float((w - s).abs().max()) for w, s in zip(want, start, strict=True))
    assert moved > 1e-3  # the comparison is not between unmoved weights
    for p, w in zip(net.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=1e-7, atol=1e-8)  # float64, 100 steps


def _km_path(n: int, step_km: float) -> torch.Tensor:
    """n points step_km apart on a meridian near 45°N 45°E, where |x|, |y|, |z| ≥ 0.5 (bf16's 25 km grid)."""
    lat = torch.deg2rad(torch.tensor(45.0, dtype=torch.float64)) + torch.arange(n, dtype=torch.float64) * (
        step_km / 6371.0
    )
    lon = torch.deg2rad(torch.tensor(45.0, dtype=torch.float64))
    xyz = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin() + 0 * lat, lat.sin()], dim=-1)
    return xyz.float()


def test_bf16_autocast_keeps_kilometre_input_resolution():
    """Under bf16 autocast the input mapping stays fp32: points 1 km apart, which a bf16 input rounds onto a
    few 25 km grid nodes, still get distinct outputs, and the output's change per 1 km step mostly has
    fp32's sign (with a bf16 input: 26 points → 3 outputs, signs agree 9 %). The block MLPs themselves
    stay bf16, so this bounds what the input mapping loses, not the network's total bf16 error."""
    net = _net(dim=64, depth=2, cond_dim=32)
    x = _km_path(26, 1.0)  # 0-25 km
    assert torch.unique(x.bfloat16().float(), dim=0).shape[0] < 6  # the reference's bf16 input: a few nodes
    s, cond = torch.full((26,), 0.9), torch.randn(1, 32).expand(26, -1)
    with torch.no_grad():
        want = net(x, s, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = net(x, s, cond)
            got_guided = net.forward_guided(x, s, cond, 2.0)
    assert got.dtype == torch.float32 and got_guided.dtype == torch.float32
    assert torch.unique(got, dim=0).shape[0] == 26
    assert torch.unique(got_guided, dim=0).shape[0] == 26
    step_want, step_got = (want[1:] - want[:-1]).flatten(), (got[1:] - got[:-1]).flatten()
    big = step_want.abs() > step_want.abs().median()
    assert (torch.sign(step_want[big]) == torch.sign(step_got[big])).float().mean() > 0.5


def test_repeated_conditions_share_their_modulations_with_the_same_numbers():
    """Many points per condition (a sampler's n draws, a map's cells): the cache holds each distinct
    condition once, and the guided field and its x-gradient are those of the plain forward pass."""
    net = _net()
    items = torch.randn(4, 32)
    cond = items.repeat_interleave(torch.tensor([5, 1, 7, 3]), dim=0)  # uneven groups, like map cells
    cond = cond[torch.randperm(cond.shape[0], generator=torch.Generator().manual_seed(1))]
    x = torch.nn.functional.normalize(torch.randn(cond.shape[0], 3), dim=-1)
    cache = net.prepare(cond)
    assert cache.cond_proj.shape[0] == 4 and cache.inverse is not None
    for s in (torch.full((cond.shape[0],), 0.37), torch.rand(cond.shape[0])):
        for omega in (0.0, 2.0):
            with torch.no_grad():
                want = _two_pass(net, x, s, cond, omega) if omega else net(x, s, cond)
                got = net.forward_guided(x, s, cond, omega, cache)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            xg = x.clone().requires_grad_(True)
            plain = _two_pass(net, xg, s, cond, omega) if omega else net(xg, s, cond)
            (g_want,) = torch.autograd.grad((plain * torch.arange(3.0)).sum(), xg)
            xg2 = x.clone().requires_grad_(True)
            cached = net.forward_cached(xg2, s, omega, cache)
            (g_got,) = torch.autograd.grad((cached * torch.arange(3.0)).sum(), xg2)
            torch.testing.assert_close(cached.detach(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)
            assert g_want.abs().max() > 1e-3


def test_guided_takes_the_cached_autograd_path_only_for_frozen_networks():
    """A frozen network (a loaded geolocator) gets the cached path under autograd; a network being trained
    keeps the plain pass, so gradients reach its parameters."""
    net = _net()
    x = torch.nn.functional.normalize(torch.randn(6, 3), dim=-1).requires_grad_(True)
    s, cond = torch.full((6,), 0.5), torch.randn(2, 32).repeat_interleave(3, dim=0)
    out = guided(net, cond, 0.0)(x, s)
    out.sum().backward()
    assert net.blocks[0].ada_map[1].weight.grad is not None  # trained: the plain pass
    net.requires_grad_(False)
    calls = []
    real = net.forward_cached
    net.forward_cached = lambda *a: calls.append(1) or real(*a)
    field = guided(net, cond, 0.0)
    frozen = field(x, s)
    assert calls == [1]
    with torch.no_grad():
        torch.testing.assert_close(frozen.detach(), net(x, s, cond), rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(frozen.sum(), x)
    assert torch.isfinite(gx).all() and gx.abs().max() > 0
