"""The trainer: recovering a known distribution, exact resumption, DDP equivalence, failure handling."""

import dataclasses
import math
import os
import socket

import pytest
import torch

from geoloc.batches import InMemoryBatches
from geoloc.checkpoint import load_weights, read_config
from geoloc.config import DataConfig, FamilyConfig, LikelihoodConfig, ModelConfig
from geoloc.errors import TrainingError
from geoloc.estimators import top_k_modes
from geoloc.geolocator import Geolocator
from geoloc.presets import PRESETS, get_preset
from geoloc.sphere import angle
from geoloc.train import lr_at, train
from tests.synthetic import VmfMixtureTask


def small(family: str, steps: int, **kw):
    cfg = get_preset(f"small-{family}")
    return dataclasses.replace(
        cfg,
        steps=steps,
        model=ModelConfig(dim=kw.pop("dim", 128), depth=kw.pop("depth", 3), expansion=4),
        data=DataConfig(batch_size=kw.pop("batch", 256)),
        optim=dataclasses.replace(cfg.optim, warmup_steps=50, **kw.pop("optim", {})),
        log_every=10,
        eval_every=steps,
        dtype="fp32",
        **kw,
    )


def test_presets_construct_and_paper_values():
    assert len(PRESETS) >= 16
    osv = PRESETS["osv5m-rfm-s2"]
    assert (osv.model.dim, osv.model.depth, osv.optim.name, osv.optim.lr, osv.data.batch_size) == (
        512,
        12,
        "lamb",
        8e-4,
        1024,
    )
    inat = PRESETS["inat21-rfm-s2"]
    assert (inat.model.dim, inat.optim.weight_decay, inat.data.batch_size) == (256, 0.1, 512)
    assert PRESETS["yfcc-vmf-mix"].model.depth == 11 and PRESETS["yfcc-vmf-mix"].optim.lr == 1e-5
    assert PRESETS["yfcc-rfm-s2-10m"].steps == 10_000_000
    with pytest.raises(ValueError, match="did you mean 'small'"):
        get_preset("smal")


def test_lr_schedule():
    assert lr_at(0, 1.0, 500, 1000) == 0.0
    assert lr_at(250, 1.0, 500, 1000) == 0.5
    assert lr_at(500, 1.0, 500, 1000) == 1.0
    assert lr_at(750, 1.0, 500, 1000) == pytest.approx(0.5)
    assert lr_at(1000, 1.0, 500, 1000) == pytest.approx(0.0)


@pytest.mark.slow
def test_rfm_recovers_a_known_conditional_distribution(tmp_path):
    task = VmfMixtureTask.default()
    g = torch.Generator().manual_seed(1)
    cond, xyz, _ = task.sample(20000, g)
    vc, vx, vcls = task.sample(600, g)
    train(small("rfm-s2", 900), InMemoryBatches(cond, xyz, 256), tmp_path, 8, val=(vc, vx), progress=False)
    geo = Geolocator.from_pretrained(tmp_path)
    lp = geo.log_prob(vx, vc, LikelihoodConfig(method="rk4", steps=32))
    model_nll = float(-lp.mean() / (3 * math.log(2)))
    true_nll = task.nll_bits_per_dim(vx, vcls)
    uniform_nll = math.log2(4 * math.pi) / 3
    # Stated margin: within 0.15 bits/dim of the truth (uniform is 1.5 bits/dim worse than the truth).
    assert model_nll < true_nll + 0.15, (model_nll, true_nll)
    assert model_nll > true_nll - 0.05  # a density cannot beat the truth by more than MC noise
    assert uniform_nll - true_nll > 1.4
    # Modes: class 0 is 70% Paris / 30% Sydney.
    samples = geo.sample(task.class_emb[:1], 600, steps=64, generator=torch.Generator().manual_seed(0))
    topk = top_k_modes(samples, k=2)
    modes, mass = topk.xyz[0], topk.mass[0]
    km = angle(modes.unsqueeze(1), task.centres[0].unsqueeze(0)) * 6371.0
    assert float(km[0, 0]) < 300 and float(km[1, 1]) < 300, km
    assert float(mass[0]) == pytest.approx(0.7, abs=0.1) and float(mass[1]) == pytest.approx(0.3, abs=0.1)


def test_vmf_mixture_fits_a_mixture_it_can_represent(tmp_path):
    task = VmfMixtureTask.default(kappa=30.0)
    g = torch.Generator().manual_seed(2)
    cond, xyz, _ = task.sample(8000, g)
    vc, vx, vcls = task.sample(1000, g)
    cfg = small("vmf-mix", 500, dim=64, depth=2, optim={"lr": 3e-3})
    cfg = dataclasses.replace(cfg, family=FamilyConfig(name="vmf-mix", components=2, cond_drop=0.0))
    train(cfg, InMemoryBatches(cond, xyz, 256), tmp_path, 8, progress=False)
    geo = Geolocator.from_pretrained(tmp_path)
    model_nll = float(-geo.log_prob(vx, vc).mean() / (3 * math.log(2)))
    assert model_nll < task.nll_bits_per_dim(vx, vcls) + 0.05


def _run(tmp, steps, stop_after=None, resume=True):
    task = VmfMixtureTask.default()
    cond, xyz, _ = task.sample(4096, torch.Generator().manual_seed(5))
    cfg = dataclasses.replace(
        small("rfm-s2", steps, dim=32, depth=2, batch=128), ckpt_every=1000, log_every=1
    )
    return train(
        cfg,
        InMemoryBatches(cond, xyz, 128, seed=3),
        tmp,
        8,
        progress=False,
        stop_after=stop_after,
        resume=resume,
    )


def test_resume_continues_the_same_run(tmp_path):
    full = _run(tmp_path / "full", 40)
    first = _run(tmp_path / "split", 40, stop_after=23)
    assert first.step == 23
    second = _run(tmp_path / "split", 40)
    losses_full = [r["loss"] for r in full.history]
    losses_split = [r["loss"] for r in first.history + second.history]
    assert losses_split == pytest.approx(losses_full, rel=1e-6, abs=1e-7)
    a, b = load_weights(tmp_path / "full"), load_weights(tmp_path / "split")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    cfg = read_config(tmp_path / "split")
    assert cfg["step"] == 40 and cfg["cond_dim"] == 8 and cfg["family"]["name"] == "rfm-s2"


def test_ema_really_averages(tmp_path):
    _run(tmp_path, 30)
    ema, raw = load_weights(tmp_path), load_weights(tmp_path, raw=True)
    diff = max(float((ema[k] - raw[k]).abs().max()) for k in ema if k.endswith("weight"))
    assert diff > 1e-4  # reference bug, docs/reference-behaviour.md §16.1: its "EMA" equals the raw weights


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    task = VmfMixtureTask.default()
    cond, xyz, _ = task.sample(1024, torch.Generator().manual_seed(5))

    class Poisoned(InMemoryBatches):
        def __iter__(self):
            for i, (c, x) in enumerate(super().__iter__()):
                if i >= 12:
                    c = c.clone()
                    c[0, 0] = float("nan")
                yield c, x

    cfg = dataclasses.replace(small("rfm-s2", 50, dim=32, depth=2, batch=64), ckpt_every=10)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 12"):
        train(cfg, Poisoned(cond, xyz, 64), tmp_path, 8, progress=False)
    assert read_config(tmp_path)["step"] == 10
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path).values())


def _ddp_worker(rank, world, port, out, cond, xyz):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    cfg = dataclasses.replace(small("rfm-s2", 8, dim=32, depth=2, batch=64), ckpt_every=1000)
    local = 64 // world
    # rank r serves rows [r*local:(r+1)*local] of each global batch of the single-process run
    idx = torch.arange(len(cond)).reshape(-1, 64)[:, rank * local : (rank + 1) * local].reshape(-1)

    class Fixed:
        def __iter__(self):
            for i in range(len(idx) // local):
                j = idx[i * local : (i + 1) * local]
                yield cond[j], xyz[j]

    train(cfg, Fixed(), out, 8, progress=False)
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_gloo_matches_one_process(tmp_path):
    task = VmfMixtureTask.default()
    cond, xyz, _ = task.sample(64 * 8, torch.Generator().manual_seed(9))

    class Sequential:
        def __iter__(self):
            for i in range(8):
                yield cond[i * 64 : (i + 1) * 64], xyz[i * 64 : (i + 1) * 64]

    cfg = dataclasses.replace(small("rfm-s2", 8, dim=32, depth=2, batch=64), ckpt_every=1000)
    train(cfg, Sequential(), tmp_path / "one", 8, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, tmp_path / "two", cond, xyz), nprocs=2, join=True)
    a, b = load_weights(tmp_path / "one", raw=True), load_weights(tmp_path / "two", raw=True)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst


def test_adamw_is_fused_and_steps_like_the_single_tensor_loop():
    """The trainer's AdamW is the fused kernel (one pass per tensor, the speed lever of issue 12) and takes
    the same 30 steps as torch's single-tensor AdamW with the same groups."""
    from geoloc.network import GeoAdaLNMLP, NetworkConfig
    from geoloc.train import _make_optimizer

    cfg = get_preset("small").optim
    torch.manual_seed(0)
    a = GeoAdaLNMLP(NetworkConfig(dim=32, depth=2, cond_dim=8))
    b = GeoAdaLNMLP(NetworkConfig(dim=32, depth=2, cond_dim=8))
    b.load_state_dict(a.state_dict())
    opt_a = _make_optimizer(a, cfg)
    assert opt_a.defaults.get("fused") is True
    groups = [
        {"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt_b = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)
    init = {k: v.clone() for k, v in a.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        x = torch.nn.functional.normalize(torch.randn(64, 3, generator=gen), dim=-1)
        s, cond = torch.rand(64, generator=gen), torch.randn(64, 8, generator=gen)
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            (net(x, s, cond) - x).pow(2).mean().backward()
            opt.step()
    moved = max(float((p - init[k]).abs().max()) for k, p in a.state_dict().items())
    assert moved > 1e-3
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
