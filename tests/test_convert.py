"""`geoloc convert plonk`: a state dict laid out exactly as the published PLONK checkpoints must give the same
velocity field (and the same sampler steps) after conversion.

The reference network and samplers are re-implemented here from the spec
(docs/reference-behaviour.md §4.1, §5.1, §7), operating on the raw tensors of the state dict, independently of
``geoloc.network`` and ``geoloc.families``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from geoloc.checkpoint import read_config
from geoloc.config import SampleConfig
from geoloc.convert import DATASET_BACKBONES, convert_plonk, infer_from_name, read_plonk
from geoloc.errors import CheckpointError, ConfigError
from geoloc.geolocator import Geolocator

DIM, DEPTH, EXP, COND = 32, 3, 4, 1024


# ----------------------------------------------------------------------------- reference, from the spec
def reference_state_dict(
    dim=DIM, depth=DEPTH, expansion=EXP, cond_dim=COND, seed=0
) -> dict[str, torch.Tensor]:
    """Random tensors under the reference names and shapes, including the zero-init layers.

    Names and shapes: docs/reference-behaviour.md §12.1.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        fan_in = shape[-1] if len(shape) > 1 else 1
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1.0 / math.sqrt(fan_in))

    c = dim // 4
    sd = {
        "time_embedder.encode_time.freqs": 10000.0 ** (-2.0 * torch.arange(c // 2, dtype=torch.float32) / c),
        "time_embedder.map_time.0.weight": rnd(dim, c),
        "time_embedder.map_time.0.bias": rnd(dim, scale=0.1),
        "time_embedder.map_time.2.weight": rnd(dim, dim),
        "time_embedder.map_time.2.bias": rnd(dim, scale=0.1),
        "cond_mapper.weight": rnd(dim, cond_dim),
        "cond_mapper.bias": rnd(dim, scale=0.1),
        "initial_mapper.weight": rnd(dim, 3, scale=1.0),
        "initial_mapper.bias": rnd(dim, scale=0.1),
        "final_adaln.1.weight": rnd(2 * dim, dim, scale=0.3 / math.sqrt(dim)),
        "final_adaln.1.bias": rnd(2 * dim, scale=0.1),
        "final_linear.weight": rnd(3, dim),
        "final_linear.bias": rnd(3, scale=0.1),
    }
    for i in range(depth):
        sd[f"blocks.{i}.mlp.0.weight"] = rnd(expansion * dim, dim)
        sd[f"blocks.{i}.mlp.0.bias"] = rnd(expansion * dim, scale=0.1)
        sd[f"blocks.{i}.mlp.3.weight"] = rnd(dim, expansion * dim)  # zero at init in the reference; not here
        sd[f"blocks.{i}.mlp.3.bias"] = rnd(dim, scale=0.1)
        sd[f"blocks.{i}.ada_map.1.weight"] = rnd(3 * dim, dim, scale=0.3 / math.sqrt(dim))
        sd[f"blocks.{i}.ada_map.1.bias"] = rnd(3 * dim, scale=0.1)
    return sd


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _ln(h):
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + 1e-5)


def reference_forward(sd, y, gamma, emb):
    """The reference GeoAdaLNMLP.forward (docs/reference-behaviour.md §4.1) on raw tensors: ψ(y, γ, emb)."""
    dim = sd["cond_mapper.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    c_ch = dim // 4
    i = torch.arange(c_ch // 2, dtype=torch.float64)
    freqs = (10000.0 ** (-2.0 * i / c_ch)).to(y.dtype)
    s = (1000.0 * gamma).unsqueeze(-1) * freqs
    feats = torch.cat([torch.cos(s), torch.sin(s)], dim=-1)
    feats = (feats - feats.mean(-1, keepdim=True)) / feats.std(-1, keepdim=True, unbiased=True)
    t_emb = _lin(
        torch.nn.functional.silu(_lin(feats, sd, "time_embedder.map_time.0")), sd, "time_embedder.map_time.2"
    )
    c = _lin(emb, sd, "cond_mapper") + t_emb
    h = _lin(y, sd, "initial_mapper")
    for b in range(depth):
        a, sh, g = _lin(torch.nn.functional.silu(c), sd, f"blocks.{b}.ada_map.1").chunk(3, dim=-1)
        u = (1 + a) * _ln(h) + sh
        mlp = _lin(torch.nn.functional.gelu(_lin(u, sd, f"blocks.{b}.mlp.0")), sd, f"blocks.{b}.mlp.3")
        h = h + g * mlp
    a, sh = _lin(torch.nn.functional.silu(c), sd, "final_adaln.1").chunk(2, dim=-1)
    return _lin((1 + a) * _ln(h) + sh, sd, "final_linear")


def reference_gamma(t_ref: torch.Tensor) -> torch.Tensor:
    """The sigmoid scheduler (start −7, end 3, τ 1) in the reference's time: γ(0) = 1 data, γ(1) = 0 noise."""
    vs, ve = (
        torch.sigmoid(torch.tensor(-7.0, dtype=torch.float64)),
        torch.sigmoid(torch.tensor(3.0, dtype=torch.float64)),
    )
    return ((ve - torch.sigmoid(-7.0 + 10.0 * t_ref)) / (ve - vs)).clamp(1e-9, 1.0)


def reference_gamma_grid(steps: int) -> torch.Tensor:
    """γ_k at t_k = 1 − k/N, k = 0..N (docs/reference-behaviour.md §7): from noise (γ≈0) to data (γ = 1)."""
    k = torch.arange(steps + 1, dtype=torch.float64)
    return reference_gamma(1.0 - k / steps)


# ----------------------------------------------------------------------------- fixtures
def write_hub(folder, sd, **cfg_over):
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    cfg = {"cond_dim": COND, "depth": DEPTH, "dim": DIM, "expansion": EXP, "input_dim": 3, **cfg_over}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def ref_sd():
    return reference_state_dict()


def _inputs(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    gamma = torch.rand(n, generator=g).double().pow(2).float()  # many low-noise and high-noise levels
    emb = torch.randn(n, COND, generator=g)
    return x, gamma, emb


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", ["rfm-s2", "flow-r3", "diffusion-r3"])
def test_converted_network_matches_reference_forward(tmp_path, ref_sd, family):
    hub = write_hub(tmp_path / "PLONK_YFCC", ref_sd)
    res = convert_plonk(hub, tmp_path / "out", family=family)
    assert res.family == family and res.backbone == "dinov2-l-reg" and res.tensors == len(ref_sd)
    geo = Geolocator.from_pretrained(tmp_path / "out")
    x, gamma, emb = _inputs()
    psi = reference_forward(ref_sd, x, gamma, emb)
    with torch.no_grad():
        out = geo.net(x, gamma, emb)
        vel = geo.family.velocity(geo.net, emb, 0.0)(x, gamma)
    assert psi.abs().mean() > 0.1  # a non-trivial field (the zero-init layers were randomised)
    torch.testing.assert_close(out, psi, rtol=1e-5, atol=1e-5)
    if family == "rfm-s2":  # dx/dγ toward the data, restricted to the tangent plane of S²
        expect = psi - (psi * x).sum(-1, keepdim=True) * x
        torch.testing.assert_close(vel, expect, rtol=1e-5, atol=1e-5)
    elif family == "flow-r3":  # dx/dγ = x₀ − ε, unchanged
        torch.testing.assert_close(vel, psi, rtol=1e-5, atol=1e-5)
    cfg = read_config(tmp_path / "out")
    assert cfg["family"]["schedule"] == "sigmoid"
    assert cfg["family"]["schedule_params"] == {"start": -7.0, "end": 3.0, "tau": 1.0}
    assert cfg["backbone"]["name"] == "dinov2-l-reg" and cfg["cond_dim"] == COND
    assert cfg["converted_from"]["layout"] == "plonk-hub" and len(cfg["converted_from"]["sha256"]) == 64


def test_schedule_is_the_reference_signal_level(tmp_path, ref_sd):
    """Our α(t) on our grid (t: 0 noise → 1 data) is the reference's γ on its grid (t_ref = 1 − t)."""
    geo = Geolocator.from_pretrained(
        convert_plonk(write_hub(tmp_path / "PLONK_OSV_5M", ref_sd), tmp_path / "o").out
    )
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(geo.family.schedule.signal(t), reference_gamma(1.0 - t), rtol=1e-9, atol=1e-12)


def test_rfm_euler_sampler_matches_reference_steps(tmp_path, ref_sd):
    """x ← projx(x + (γ_{k+1} − γ_k)·ψ(x, γ_k)) (docs/reference-behaviour.md §7.3), step by step, same starts.

    With ``retraction="project"`` geoloc steps with the raw network output exactly like the reference. With
    the default exponential map it removes the normal component first and walks the great circle: both land
    near each other (the normal component only rescales a step by 1/(1 + h·x·ψ)).
    """
    geo = Geolocator.from_pretrained(
        convert_plonk(write_hub(tmp_path / "PLONK_YFCC", ref_sd), tmp_path / "o").out
    )
    steps, n = 6, 32
    _, _, emb = _inputs(1, seed=3)
    traj: list[torch.Tensor] = []
    cfg = SampleConfig(steps=steps, method="euler", retraction="project")
    out = geo.family.sample(geo.net, emb, n, cfg, torch.Generator().manual_seed(0), traj)
    states = traj[0]  # (n, steps + 1, 3)
    grid = reference_gamma_grid(steps).float()
    x_raw = states[:, 0]
    cond = emb.expand(n, -1)
    for k in range(steps):
        h = grid[k + 1] - grid[k]
        assert h > 0  # time runs from noise to data
        psi_raw = reference_forward(ref_sd, x_raw, grid[k].expand(n), cond)
        x_raw = torch.nn.functional.normalize(x_raw + h * psi_raw, dim=-1)
        torch.testing.assert_close(states[:, k + 1], x_raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], x_raw, rtol=1e-5, atol=1e-5)
    exp = geo.family.sample(geo.net, emb, n, SampleConfig(steps=steps), torch.Generator().manual_seed(0))
    assert (exp[0] * x_raw).sum(-1).clamp(-1, 1).acos().median() < 0.5


def test_flow_euler_sampler_matches_reference_steps(tmp_path, ref_sd):
    """FM in R³ (docs/reference-behaviour.md §7.2): x ← x + (γ_{k+1} − γ_k)·ψ(x, γ_k), exactly.

    geoloc only projects at the end.
    """
    geo = Geolocator.from_pretrained(
        convert_plonk(write_hub(tmp_path / "PLONK_YFCC_flow", ref_sd), tmp_path / "o").out
    )
    assert geo.family.name == "flow-r3"
    steps, n = 5, 16
    _, _, emb = _inputs(1, seed=4)
    traj: list[torch.Tensor] = []
    geo.family.sample(geo.net, emb, n, SampleConfig(steps=steps), torch.Generator().manual_seed(1), traj)
    states, grid, x = traj[0], reference_gamma_grid(steps).float(), traj[0][:, 0]
    for k in range(steps):
        x = x + (grid[k + 1] - grid[k]) * reference_forward(ref_sd, x, grid[k].expand(n), emb.expand(n, -1))
        torch.testing.assert_close(states[:, k + 1], x, rtol=1e-4, atol=1e-5)


def test_diffusion_ddim_matches_reference_steps(tmp_path, ref_sd):
    """DDIM η = 0 (docs/reference-behaviour.md §7.1), ε = ψ: x̂₀ clamped to [−1, 1], ε re-derived, stepped."""
    geo = Geolocator.from_pretrained(
        convert_plonk(write_hub(tmp_path / "PLONK_YFCC_diffusion", ref_sd), tmp_path / "o").out
    )
    assert geo.family.name == "diffusion-r3"
    steps, n = 5, 16
    _, _, emb = _inputs(1, seed=5)
    traj: list[torch.Tensor] = []
    geo.family.sample(geo.net, emb, n, SampleConfig(steps=steps), torch.Generator().manual_seed(2), traj)
    states, grid, x = traj[0], reference_gamma_grid(steps).float(), traj[0][:, 0]
    for k in range(steps):
        g, g2 = grid[k], grid[k + 1]
        eps = reference_forward(ref_sd, x, g.expand(n), emb.expand(n, -1))
        x0 = ((x - (1 - g).sqrt() * eps) / g.sqrt()).clamp(-1, 1)
        eps = (x - g.sqrt() * x0) / (1 - g).sqrt()
        x = g2.sqrt() * x0 + (1 - g2).sqrt() * eps
        torch.testing.assert_close(states[:, k + 1], x, rtol=1e-4, atol=1e-4)


def test_lightning_ckpt_takes_the_ema_network(tmp_path, ref_sd):
    other = reference_state_dict(seed=9)
    state = {
        **{f"ema_network.{k}": v for k, v in ref_sd.items()},
        **{f"network.{k}": v for k, v in other.items()},
        "loss.dummy": torch.zeros(1),
    }
    run = tmp_path / "osv_5m_geoadalnmlp_r3_small_sigmoid_flow_riemann_-7_3"
    run.mkdir()
    torch.save({"state_dict": state, "global_step": 10}, run / "last.ckpt")
    res = convert_plonk(run / "last.ckpt", tmp_path / "o")
    assert (res.family, res.backbone, res.dataset) == ("rfm-s2", "streetclip", "osv5m")
    geo = Geolocator.from_pretrained(tmp_path / "o")
    x, gamma, emb = _inputs(8)
    with torch.no_grad():
        torch.testing.assert_close(
            geo.net(x, gamma, emb), reference_forward(ref_sd, x, gamma, emb), rtol=1e-5, atol=1e-5
        )
    raw = convert_plonk(run / "last.ckpt", tmp_path / "r", weights="raw")
    assert raw.tensors == len(ref_sd)
    with torch.no_grad():
        torch.testing.assert_close(
            Geolocator.from_pretrained(tmp_path / "r").net(x, gamma, emb),
            reference_forward(other, x, gamma, emb),
            rtol=1e-5,
            atol=1e-5,
        )


def test_buffer_may_be_absent_and_sizes_come_from_shapes(tmp_path, ref_sd):
    sd = {k: v for k, v in ref_sd.items() if not k.endswith("freqs")}
    hub = tmp_path / "hub" / "PLONK_iNaturalist"
    hub.mkdir(parents=True)
    save_file(sd, str(hub / "model.safetensors"))  # no config.json at all
    state, net, prov = read_plonk(hub)
    assert len(state) == len(sd)
    assert net == {"cond_dim": COND, "depth": DEPTH, "dim": DIM, "expansion": EXP, "input_dim": 3}
    assert prov["config"] is None
    res = convert_plonk(hub / "model.safetensors", tmp_path / "o")
    assert (res.backbone, res.dataset) == (DATASET_BACKBONES["inat21"], "inat21")


def test_bad_inputs_are_one_line_errors(tmp_path, ref_sd):
    with pytest.raises(CheckpointError, match="says depth=5"):
        read_plonk(write_hub(tmp_path / "PLONK_YFCC", ref_sd, depth=5))
    bad = dict(ref_sd)
    bad["time_embedder.encode_time.freqs"] = bad["time_embedder.encode_time.freqs"] * 2
    with pytest.raises(CheckpointError, match="freqs differs"):
        convert_plonk(write_hub(tmp_path / "a" / "PLONK_YFCC", bad), tmp_path / "o1")
    with pytest.raises(ConfigError, match="pass --backbone"):
        convert_plonk(write_hub(tmp_path / "anon", ref_sd), tmp_path / "o2")
    ok = convert_plonk(tmp_path / "anon", tmp_path / "o3", backbone="streetclip", family="flow-r3")
    assert ok.family == "flow-r3"
    with pytest.raises(CheckpointError, match="--force"):
        convert_plonk(tmp_path / "anon", tmp_path / "o3", backbone="streetclip")
    with pytest.raises(ConfigError, match="unknown PLONK family"):
        convert_plonk(tmp_path / "anon", tmp_path / "o4", backbone="streetclip", family="vmf")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        read_plonk(tmp_path / "junk")
    r2 = {k: v for k, v in ref_sd.items()}
    r2["initial_mapper.weight"] = torch.zeros(DIM, 2)
    save_file(r2, str(tmp_path / "r2.safetensors"))
    with pytest.raises(CheckpointError, match="R²"):
        read_plonk(tmp_path / "r2.safetensors")


@pytest.mark.parametrize(
    "path, expect",
    [
        ("hub/PLONK_YFCC", ("yfcc", "rfm-s2")),
        ("hub/PLONK_OSV_5M_flow", ("osv5m", "flow-r3")),
        ("hub/PLONK_iNaturalist_diffusion/model.safetensors", ("inat21", "diffusion-r3")),
        (
            "cache/models--nicolas-dufour--PLONK_YFCC_flow/snapshots/0123abc/model.safetensors",
            ("yfcc", "flow-r3"),
        ),
        ("runs/YFCC100M_geoadalnmlp_r3_small_sigmoid_flow_riemann_10M_10M/last.ckpt", ("yfcc", "rfm-s2")),
        ("runs/osv_5m_geoadalnmlp_r3_small_sigmoid_diffusion/last.ckpt", ("osv5m", "diffusion-r3")),
        ("somewhere/model", (None, None)),
    ],
)
def test_infer_from_name(path, expect):
    assert infer_from_name(path) == expect


def test_cli_convert_plonk(tmp_path, ref_sd):
    from typer.testing import CliRunner

    from geoloc.cli import app

    hub = write_hub(tmp_path / "PLONK_OSV_5M_flow", ref_sd)
    r = CliRunner().invoke(app, ["convert", "plonk", str(hub), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "flow-r3, backbone streetclip, dataset osv5m" in r.output and f"{len(ref_sd)} tensors" in r.output
    cfg = read_config(tmp_path / "out")
    assert cfg["family"]["name"] == "flow-r3" and cfg["command"].startswith("geoloc")
    r = CliRunner().invoke(app, ["convert", "plonk", str(hub), str(tmp_path / "out"), "--family", "rfm-s2"])
    assert isinstance(r.exception, CheckpointError)
    r = CliRunner().invoke(
        app,
        [
            "convert",
            "plonk",
            str(hub),
            str(tmp_path / "out"),
            "--family",
            "rfm-s2",
            "--backbone",
            "dinov2-l-reg",
            "--force",
        ],
    )
    assert r.exit_code == 0 and read_config(tmp_path / "out")["backbone"]["name"] == "dinov2-l-reg"
