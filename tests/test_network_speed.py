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
