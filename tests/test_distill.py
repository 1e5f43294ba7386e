"""Guidance distillation: the one-pass student reproduces the guided field and guided samples of a trained
teacher on a known conditional distribution; other ω and the likelihood stay the teacher's exactly; the
checkpoint round-trips."""

import json

import pytest
import torch

from geoloc.batches import InMemoryBatches
from geoloc.config import (
    DataConfig,
    DistillConfig,
    FamilyConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from geoloc.distill import GuidanceDistilled, distill, distillation_points, field_error
from geoloc.errors import CheckpointError, ConfigError
from geoloc.geolocator import Geolocator
from geoloc.sphere import EARTH_RADIUS_KM, angle
from geoloc.train import train
from tests.synthetic import VmfMixtureTask

OMEGA = 2.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small RFM-S² teacher trained on the 4-class vMF mixture task, and its distilled student."""
    torch.set_num_threads(1)
    task = VmfMixtureTask.default(dim=8, kappa=60.0)
    cond, xyz, _ = task.sample(4096, torch.Generator().manual_seed(0))
    cfg = TrainConfig(
        model=ModelConfig(dim=32, depth=2, expansion=2),
        family=FamilyConfig(name="rfm-s2"),
        optim=OptimConfig(name="adamw", lr=3e-3, warmup_steps=20, weight_decay=0.0),
        data=DataConfig(batch_size=256),
        steps=300,
        log_every=100,
        eval_every=10**6,
        ckpt_every=10**6,
        device="cpu",
        dtype="fp32",
    )
    out = tmp_path_factory.mktemp("teacher")
    train(cfg, InMemoryBatches(cond, xyz, 256, seed=0), out, 8, progress=False, resume=False)
    geo = Geolocator.from_pretrained(out)
    val = task.sample(512, torch.Generator().manual_seed(5))[:2]
    dcfg = DistillConfig(steps=200, batch_size=256, lr=1e-3, warmup_steps=20, val_points=512)
    res = distill(geo.net, geo.family, InMemoryBatches(cond, xyz, 256, seed=1), dcfg, val=val)
    return task, geo, res


def test_student_field_matches_the_guided_field(trained):
    task, geo, res = trained
    # Before: the student is the teacher's conditional branch, ω·|ψ(c) − ψ(∅)| away from the guided field.
    assert res.field_error_before > 0.3
    assert res.field_error_after < 0.08
    assert res.field_error_after < res.field_error_before / 8
    assert res.history[-1]["loss"] < res.history[0]["loss"] / 10
    # On points the loop never saw (another seed, another NFE), the same holds.
    cond, xyz, _ = task.sample(256, torch.Generator().manual_seed(11))
    pts = distillation_points(
        geo.net, geo.family, cond, xyz, OMEGA, sampler_steps=12, generator=torch.Generator().manual_seed(3)
    )
    assert pts[0].shape == (256, 3) and pts[3].shape == (256, 3)
    assert field_error(res.student, pts) < 0.1 < field_error(geo.net, pts)


def test_guided_samples_from_the_same_noise_are_close(trained):
    task, geo, res = trained
    cond, _, _ = task.sample(256, torch.Generator().manual_seed(9))
    distilled = GuidanceDistilled(geo.net, res.student, OMEGA)
    undistilled = GuidanceDistilled(geo.net, geo.net, OMEGA)  # the conditional branch alone, one pass
    cfg = SampleConfig(steps=16, omega=OMEGA)
    with torch.no_grad():
        teacher = geo.family.sample(geo.net, cond, 1, cfg, torch.Generator().manual_seed(3))[:, 0]
        student = geo.family.sample(distilled, cond, 1, cfg, torch.Generator().manual_seed(3))[:, 0]
        plain = geo.family.sample(undistilled, cond, 1, cfg, torch.Generator().manual_seed(3))[:, 0]
    km = angle(teacher, student) * EARTH_RADIUS_KM
    km_plain = angle(teacher, plain) * EARTH_RADIUS_KM
    # The modes are ≈ 800 km wide (κ = 60); the student's draws land ~40 km from the teacher's.
    assert float(km.median()) < 100 and float(km.quantile(0.9)) < 300
    assert float(km_plain.median()) > 10 * float(km.median())


def test_other_omegas_and_the_likelihood_are_the_teachers_exactly(trained):
    task, geo, res = trained
    cond, xyz, _ = task.sample(64, torch.Generator().manual_seed(13))
    distilled = GuidanceDistilled(geo.net, res.student, OMEGA)
    with torch.no_grad():
        for omega in (0.0, 1.0, 3.0):
            cfg = SampleConfig(steps=8, omega=omega)
            a = geo.family.sample(geo.net, cond, 2, cfg, torch.Generator().manual_seed(1))
            b = geo.family.sample(distilled, cond, 2, cfg, torch.Generator().manual_seed(1))
            assert torch.equal(a, b), omega
        cfg = SampleConfig(steps=8, omega=OMEGA)
        a = geo.family.sample(geo.net, cond, 1, cfg, torch.Generator().manual_seed(1))
        b = geo.family.sample(distilled, cond, 1, cfg, torch.Generator().manual_seed(1))
        assert not torch.equal(a, b)  # at the distilled ω the student runs
    lp_teacher = geo.family.log_prob(geo.net, xyz, cond)
    lp_distilled = geo.family.log_prob(distilled, xyz, cond)
    assert torch.equal(lp_teacher, lp_distilled)


def test_checkpoint_round_trip_and_errors(trained, tmp_path):
    task, geo, res = trained
    cfg = {**geo.config, "distilled": {"omega": OMEGA, "steps": 200}}
    geo_d = Geolocator(GuidanceDistilled(geo.net, res.student, OMEGA), geo.family, geo.cond_dim, config=cfg)
    out = geo_d.save_pretrained(tmp_path / "d")
    assert (out / "student.safetensors").is_file()
    back = Geolocator.from_pretrained(out)
    assert isinstance(back.net, GuidanceDistilled) and back.net.omega == OMEGA
    for k, v in res.student.state_dict().items():
        assert torch.equal(back.net.student.state_dict()[k], v), k
    for k, v in geo.net.state_dict().items():
        assert torch.equal(back.net.teacher.state_dict()[k], v), k
    cond, _, _ = task.sample(32, torch.Generator().manual_seed(2))
    a = geo_d.sample(cond, 2, omega=OMEGA, steps=8, generator=torch.Generator().manual_seed(4))
    b = back.sample(cond, 2, omega=OMEGA, steps=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    # A missing student file or a config without ω: one clear error, not a silent teacher.
    (out / "student.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"student\.safetensors"):
        Geolocator.from_pretrained(out)
    geo_d.save_pretrained(out)
    bad = json.loads((out / "config.json").read_text())
    bad["distilled"] = {"steps": 3}
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="omega"):
        Geolocator.from_pretrained(out)


def test_distill_refuses_what_it_cannot_distil(trained):
    task, geo, res = trained
    cond, xyz, _ = task.sample(64, torch.Generator().manual_seed(1))
    batches = InMemoryBatches(cond, xyz, 32)
    with pytest.raises(ConfigError, match="already guidance-distilled"):
        distill(GuidanceDistilled(geo.net, res.student, OMEGA), geo.family, batches, DistillConfig(steps=1))
    vmf = Geolocator.build(FamilyConfig(name="vmf"), ModelConfig(dim=16, depth=1), 8)
    with pytest.raises(ConfigError, match="no guided sampler"):
        distill(vmf.net, vmf.family, batches, DistillConfig(steps=1))
    with pytest.raises(ConfigError, match="trajectory_fraction"):
        DistillConfig(trajectory_fraction=1.5)
