"""Schedules (values from the reference table, exact derivatives) and the network (sizes, names, init)."""

import pytest
import torch

from geoloc.network import GeoAdaLNMLP, NetworkConfig, VonMisesFisherNet, count_parameters
from geoloc.schedules import CosineSchedule, LinearSchedule, SigmoidSchedule, make_schedule


def test_sigmoid_matches_reference_table():
    # docs/reference-behaviour.md §5.1 lists γ_ref(t_ref); our α(t) = γ_ref(1 − t).
    s = SigmoidSchedule()
    t_ref = torch.tensor([0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0], dtype=torch.float64)
    expected = [1, 0.99836, 0.98206, 0.87570, 0.71836, 0.47556, 0.23277, 0.07542, 0.00497, 1e-9]
    got = s.signal(1 - t_ref)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=6e-6)
    # γ'(0) ≈ −0.00956, min γ' = −2.627 at t_ref = 0.7, γ'(1) ≈ −0.4747 (signs flip with time)
    d = s.dsignal(1 - torch.tensor([0.0, 0.7, 1.0], dtype=torch.float64))
    assert torch.allclose(d, torch.tensor([0.00956, 2.627, 0.4747], dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize(
    "sched", [SigmoidSchedule(), SigmoidSchedule(-3, 3, 0.9), LinearSchedule(), CosineSchedule()]
)
def test_derivative_is_exact(sched):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    fd = (sched.signal(t + h) - sched.signal(t - h)) / (2 * h)
    assert torch.allclose(sched.dsignal(t), fd, rtol=1e-5, atol=1e-8)
    assert sched.signal(torch.tensor(1.0)) == 1.0 and float(sched.signal(torch.tensor(0.0))) == pytest.approx(
        1e-9
    )
    assert abs(sched.time_of_signal(0.5) - float(t[(sched.signal(t) - 0.5).abs().argmin()])) < 0.02


def test_cosine_is_cos_squared():
    s = CosineSchedule()
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(s.signal(t), torch.sin(torch.pi * t / 2).pow(2).clamp_min(1e-9))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("sigmod")


@pytest.mark.parametrize(("dim", "depth", "params"), [(512, 12, 36_034_563), (256, 12, 9_153_539)])
def test_network_sizes_match_published_models(dim, depth, params):
    assert count_parameters(GeoAdaLNMLP(NetworkConfig(dim=dim, depth=depth, cond_dim=1024))) == params


def test_vmf_network_sizes_match_reference():
    assert count_parameters(VonMisesFisherNet(NetworkConfig(depth=11))) == 34_917_380
    assert count_parameters(VonMisesFisherNet(NetworkConfig(depth=11), components=3)) == 35_973_135


def test_state_dict_names_match_the_hub_layout():
    names = set(GeoAdaLNMLP(NetworkConfig(dim=64, depth=2, cond_dim=8)).state_dict())
    for n in [
        "time_embedder.encode_time.freqs",
        "time_embedder.map_time.0.weight",
        "time_embedder.map_time.2.bias",
        "cond_mapper.weight",
        "initial_mapper.bias",
        "blocks.1.ada_map.1.weight",
        "blocks.0.mlp.0.weight",
        "blocks.1.mlp.3.bias",
        "final_adaln.1.weight",
        "final_linear.bias",
    ]:
        assert n in names
    assert GeoAdaLNMLP(NetworkConfig(dim=512)).state_dict()["time_embedder.encode_time.freqs"].shape == (64,)


def test_blocks_start_as_identity_and_condition_matters():
    torch.manual_seed(0)
    net = GeoAdaLNMLP(NetworkConfig(dim=32, depth=3, expansion=2, cond_dim=4))
    x, s, c = torch.randn(5, 3), torch.rand(5), torch.randn(5, 4)
    h = net.initial_mapper(x)
    cc = net.cond_mapper(c) + net.time_embedder(s)
    for b in net.blocks:
        assert torch.equal(b(h, cc), h)  # zero-initialised MLP output
    assert not torch.allclose(net(x, s, c), net(x, s, torch.zeros_like(c)))
    assert not torch.allclose(net(x, s, c), net(x, 1 - s, c))
