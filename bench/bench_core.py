"""Core engine speed and accuracy: training steps/s, sampling points/s, likelihood cost/accuracy, quality vs
NFE.

Prints ONE JSON object (progress goes to stderr). Sections (``--sections``, all by default):

- ``train``: steps/s of the trainer's exact per-step work (``family.draw`` → ``family.loss`` under optional
  bf16 autocast → backward → clip → optimiser step → EMA update) for the paper's network (512 × 12,
  batch 1024, condition 1024, AdamW) and the ``small`` preset, fp32 and bf16 interleaved; plus AdamW vs
  LAMB (the paper presets' optimiser) step time on the paper network's gradients.
- ``sample``: sampling points/s at the paper network size for rfm-s2, flow-r3 and diffusion-r3, without and
  with guidance (ω = 2: one forward pass over a doubled batch). Every number is measured through the real
  ``family.sample``: the cost of one solver step is timed at 4 steps (batch 256 points) and points/s at 16 /
  32 / 64 / 250 NFE is ``batch / (NFE × step cost)`` (sampling is linear in the step count); one real 16-step
  run checks that projection. Also the bare forward time (the floor) and the bf16-autocast forward time.
- ``likelihood``: cost of one likelihood evaluation (field + exact divergence) against a forward pass at
  the paper size, and — for an RFM trained in this run on ``tests.synthetic.VmfMixtureTask`` — points/s,
  NFE and the error (nats and bits/dim) of dopri5 (1e-6 = the reference's tolerance, and looser) and fixed
  rk4 at 8/16/32/64 steps against dopri5 at 1e-7 on the SAME points.
- ``quality``: per family trained on the synthetic task (rfm-s2, flow-r3, diffusion-r3), for Euler 250 (the
  paper) and Euler / Heun / midpoint / RK4 at ≤ 32 NFE: GeoScore and mean km of one guided draw (ω = 2) per
  item against the true location, the true-density NLL and the energy distance to true draws of unguided
  samples, and the model NLL (bits/dim) from the likelihood with the same solver, vs dopri5. Whether the
  goal (Euler-250 quality at ≤ 32 network evaluations) is met, with the criteria in the output.

Entries named ``proposed*`` time a change suggested for the core next to today's code (2-VJP surface
divergence, conditioning computed once per condition, fused AdamW); they are measured here, not used by
geoloc.

Timings are medians of interleaved repeats (the machine may be shared; ``loadavg`` is recorded). Torch runs
with ONE thread unless ``--threads`` says otherwise: on the shared 2-core development machine, two threads
made every op 2-4x slower (OpenMP threads wait on a core another process holds).
``--cache-dir DIR`` keeps the synthetic models between runs (else they are trained in a temp dir).

    python bench/bench_core.py                 # ≈ 5-7 min on a (busy) 2-core CPU
    python bench/bench_core.py --quick         # ≈ 1 min smoke run (tiny sizes: numbers are not meaningful)
    python bench/bench_core.py --sections likelihood,quality --cache-dir /tmp/geoloc-bench-models
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

from geoloc.batches import InMemoryBatches  # noqa: E402
from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig, OptimConfig, SampleConfig  # noqa: E402
from geoloc.errors import ConfigError  # noqa: E402
from geoloc.families import make_family, vmf_sample  # noqa: E402
from geoloc.geolocator import Geolocator  # noqa: E402
from geoloc.metrics import geoscore  # noqa: E402
from geoloc.presets import get_preset  # noqa: E402
from geoloc.solvers import _field_and_divergence, homogeneous_tangent  # noqa: E402
from geoloc.sphere import EARTH_RADIUS_KM, angle, project, sample_uniform  # noqa: E402
from geoloc.train import _make_optimizer, _step_generator, lr_at, train  # noqa: E402
from tests.synthetic import VmfMixtureTask  # noqa: E402

LN2 = math.log(2.0)
PAPER = ModelConfig(dim=512, depth=12, expansion=4)
PAPER_COND = 1024
NFES = (16, 32, 64, 250)
# Sampler settings of the quality table: (method, steps); NFE = steps × stages.
SETTINGS = (
    ("euler", 250),
    ("euler", 16),
    ("euler", 32),
    ("heun", 8),
    ("heun", 16),
    ("midpoint", 8),
    ("midpoint", 16),
    ("rk4", 4),
    ("rk4", 8),
)
STAGES = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that --quick shrinks."""

    train_batch: int = 1024
    train_repeats: int = 3
    small_repeats: int = 8
    sample_batch: int = 256
    probe_steps: int = 4
    sample_repeats: int = 3
    lik_batch: int = 256  # points per paper-size likelihood evaluation
    synth_steps: dict = dataclasses.field(
        default_factory=lambda: {"rfm-s2": 3000, "flow-r3": 2000, "diffusion-r3": 2000}
    )
    synth_train_rows: int = 20000
    lik_points: int = 256
    quality_points: int = 1000
    dopri_tols: tuple = (1e-6, 1e-5, 1e-4)
    ref_tol: float = 1e-7
    other_ref_tol: float = 1e-5  # dopri5 reference of the flow-r3 / diffusion-r3 NLL column


QUICK = Sizes(
    train_batch=64,
    train_repeats=1,
    small_repeats=2,
    sample_batch=32,
    probe_steps=2,
    sample_repeats=1,
    lik_batch=32,
    synth_steps={"rfm-s2": 150, "flow-r3": 100, "diffusion-r3": 100},
    synth_train_rows=4000,
    lik_points=64,
    quality_points=200,
    dopri_tols=(1e-4,),
    ref_tol=1e-5,
    other_ref_tol=1e-3,
)


def log(msg: str) -> None:
    print(f"[bench_core {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run round-robin so machine noise hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: med(v) for k, v in times.items()}


def r(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (JSON readability)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(0, digits - 1 - math.floor(math.log10(abs(x)))))


# ----------------------------------------------------------------------------------------------- training
def train_stepper(
    model: ModelConfig, optim: OptimConfig, cond_dim: int, batch: int, bf16: bool, family: str = "rfm-s2"
) -> tuple[Callable[[], None], torch.nn.Module]:
    """One trainer step (geoloc.train's per-step operations, minus logging/checkpoints) as a closure."""
    fam = make_family(FamilyConfig(name=family))
    torch.manual_seed(0)
    net = fam.build_network(model, cond_dim)
    opt = _make_optimizer(net, optim)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(optim.ema_decay), use_buffers=True)
    g = torch.Generator().manual_seed(0)
    cond, xyz = torch.randn(batch, cond_dim, generator=g), sample_uniform(batch, g)
    state = {"step": 0}

    def step() -> None:
        k = state["step"]
        state["step"] += 1
        for group in opt.param_groups:
            group["lr"] = lr_at(k, optim.lr, optim.warmup_steps, 10_000)
        draws = fam.draw(batch, _step_generator(0, k), torch.device("cpu"), torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fam.loss(net, xyz, cond, draws=draws)
        float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), optim.grad_clip)
        opt.step()
        ema.update_parameters(net)

    return step, net


def bench_train(sz: Sizes) -> dict:
    out: dict = {}
    paper_optim = dataclasses.replace(get_preset("osv5m-rfm-s2").optim, name="adamw")
    log(
        f"train: paper network, batch {sz.train_batch}, fp32 vs bf16 ({sz.train_repeats} interleaved repeats)"
    )
    f32, net32 = train_stepper(PAPER, paper_optim, PAPER_COND, sz.train_batch, bf16=False)
    b16, _ = train_stepper(PAPER, paper_optim, PAPER_COND, sz.train_batch, bf16=True)
    t = interleaved({"fp32": f32, "bf16": b16}, sz.train_repeats)
    out["paper"] = {
        "model": dataclasses.asdict(PAPER),
        "cond_dim": PAPER_COND,
        "batch": sz.train_batch,
        "optimizer": "adamw",
        "parameters": sum(p.numel() for p in net32.parameters()),
        "fp32_steps_per_s": r(1 / t["fp32"]),
        "bf16_steps_per_s": r(1 / t["bf16"]),
        "fp32_samples_per_s": r(sz.train_batch / t["fp32"]),
        "bf16_samples_per_s": r(sz.train_batch / t["bf16"]),
        "bf16_speedup": r(t["fp32"] / t["bf16"], 3),
    }
    # Optimiser step alone on the fp32 network's gradients: AdamW (foreach) vs LAMB (the paper presets').
    # PROPOSED: AdamW(fused=True) (torch >= 2.4 has a fused CPU kernel), same parameter groups as the trainer.
    adamw = _make_optimizer(net32, paper_optim)
    lamb = _make_optimizer(net32, dataclasses.replace(paper_optim, name="lamb"))
    fused = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adamw.param_groups],
        lr=paper_optim.lr,
        betas=paper_optim.betas,
        fused=True,
    )
    ts = interleaved(
        {"adamw": adamw.step, "lamb": lamb.step, "adamw_fused_proposed": fused.step}, max(2, sz.train_repeats)
    )
    out["paper"]["optimizer_step_s"] = {k: r(v, 3) for k, v in ts.items()}
    out["paper"]["lamb_step_share_of_train_step"] = {
        "fp32": r(ts["lamb"] / (t["fp32"] - ts["adamw"] + ts["lamb"]), 3),
        "bf16": r(ts["lamb"] / (t["bf16"] - ts["adamw"] + ts["lamb"]), 3),
    }
    del f32, b16, net32, adamw, lamb, fused

    small = get_preset("small")
    cond_dim = 384
    log(
        f"train: small preset ({small.model.dim}×{small.model.depth}, batch {small.data.batch_size}, "
        f"cond {cond_dim})"
    )
    s32, _ = train_stepper(small.model, small.optim, cond_dim, small.data.batch_size, bf16=False)
    s16, _ = train_stepper(small.model, small.optim, cond_dim, small.data.batch_size, bf16=True)
    t = interleaved({"fp32": s32, "bf16": s16}, sz.small_repeats, warmup=2)
    out["small"] = {
        "model": dataclasses.asdict(small.model),
        "cond_dim": cond_dim,
        "batch": small.data.batch_size,
        "optimizer": small.optim.name,
        "fp32_steps_per_s": r(1 / t["fp32"]),
        "bf16_steps_per_s": r(1 / t["bf16"]),
        "fp32_samples_per_s": r(small.data.batch_size / t["fp32"]),
        "bf16_samples_per_s": r(small.data.batch_size / t["bf16"]),
        "bf16_speedup": r(t["fp32"] / t["bf16"], 3),
    }
    return out


# ----------------------------------------------------------------------------------------------- sampling
def paper_network(cond_dim: int = PAPER_COND) -> torch.nn.Module:
    """The 512 × 12 network, one architecture for the three ODE families (speed is independent of weights)."""
    torch.manual_seed(0)
    net = make_family(FamilyConfig(name="rfm-s2")).build_network(PAPER, cond_dim).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    for mod in net.modules():  # the zero-initialised block outputs, so equality checks are not trivial
        if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
            torch.nn.init.normal_(mod.weight, std=0.02)
    return net


def conditioning_share(net: torch.nn.Module) -> float:
    """Fraction of the network's multiply-adds that depend only on (cond, s), not on x (see report)."""
    total = sum(p.numel() for n, p in net.named_parameters() if n.endswith("weight"))
    cond_only = sum(
        p.numel()
        for n, p in net.named_parameters()
        if n.endswith("weight")
        and (".ada_map." in n or n.startswith(("final_adaln.", "cond_mapper.", "time_embedder.")))
    )
    return cond_only / total


def shared_forward(
    net: torch.nn.Module, x: torch.Tensor, s: torch.Tensor, cond_u: torch.Tensor
) -> torch.Tensor:
    """PROPOSED: GeoAdaLNMLP's forward for n points per condition, conditioning computed once per condition.

    ``x (U·n, 3)`` grouped by condition, ``s`` one signal level (a sampling / likelihood step),
    ``cond_u (U, D)``. cond_mapper, the time embedding, every block's ada_map and the final AdaLN only see
    (cond, s): ~30% of the multiply-adds at 512 × 12 / cond 1024, which today run once per point.
    """
    u = cond_u.shape[0]
    c = net.cond_mapper(cond_u) + net.time_embedder(s.expand(u))
    h = net.initial_mapper(x).view(u, x.shape[0] // u, -1)
    for blk in net.blocks:
        scale, shift, gate = blk.ada_map(c).unsqueeze(1).chunk(3, dim=-1)
        h = h + gate * blk.mlp((1 + scale) * blk.norm(h) + shift)
    scale, shift = net.final_adaln(c).unsqueeze(1).chunk(2, dim=-1)
    return net.final_linear((1 + scale) * net.final_norm(h) + shift).reshape(x.shape[0], -1)


def shared_conditioning(net: torch.nn.Module, rows: int, repeats: int, per_cond: int = 64) -> dict:
    """Forward time of ``rows`` points, ``per_cond`` per condition: today's forward vs shared_forward."""
    g = torch.Generator().manual_seed(5)
    u = max(1, rows // per_cond)
    cond_u, x, s = torch.randn(u, PAPER_COND, generator=g), sample_uniform(u * per_cond, g), torch.tensor(0.4)
    flat = cond_u.repeat_interleave(per_cond, dim=0)
    with torch.no_grad():
        t = interleaved(
            {
                "today": lambda: net(x, s.expand(len(x)), flat),
                "shared": lambda: shared_forward(net, x, s, cond_u),
            },
            repeats,
        )
        diff = float((net(x, s.expand(len(x)), flat) - shared_forward(net, x, s, cond_u)).abs().max())
    return {
        "points": u * per_cond,
        "points_per_condition": per_cond,
        "forward_s": r(t["today"], 3),
        "shared_forward_s": r(t["shared"], 3),
        "speedup": r(t["today"] / t["shared"], 3),
        "max_abs_diff": diff,
    }


def bench_sample(sz: Sizes, net: torch.nn.Module) -> dict:
    b = sz.sample_batch
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(b, PAPER_COND, generator=g)
    out: dict = {
        "batch_points": b,
        "probe_steps": sz.probe_steps,
        "nfe": list(NFES),
        "conditioning_only_macs_share": r(conditioning_share(net), 3),
    }

    def fwd(rows: int, bf16: bool = False):
        x, s, c = (
            sample_uniform(rows, g),
            torch.rand(rows, generator=g),
            torch.randn(rows, PAPER_COND, generator=g),
        )

        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                net(x, s, c)

        return run

    log(f"sample: forward floor at {b} and {2 * b} rows")
    t_fwd = interleaved({"b": fwd(b), "2b": fwd(2 * b), "b_bf16": fwd(b, True)}, sz.sample_repeats)
    out["forward_s"] = {
        f"{b}_rows": r(t_fwd["b"], 3),
        f"{2 * b}_rows": r(t_fwd["2b"], 3),
        f"{b}_rows_bf16_autocast": r(t_fwd["b_bf16"], 3),
    }
    out["forward_bf16_speedup"] = r(t_fwd["b"] / t_fwd["b_bf16"], 3)
    fams = {name: make_family(FamilyConfig(name=name)) for name in ("rfm-s2", "flow-r3", "diffusion-r3")}
    probes = {}
    for name, fam in fams.items():
        for omega in (0.0, 2.0):
            cfg = SampleConfig(steps=sz.probe_steps, omega=omega)

            def run(fam=fam, cfg=cfg):
                with torch.no_grad():
                    fam.sample(net, cond, 1, cfg, torch.Generator().manual_seed(1))

            probes[f"{name}|{omega:g}"] = run
    log(f"sample: {len(probes)} probes × {sz.sample_repeats} repeats at {sz.probe_steps} steps")
    t = interleaved(probes, sz.sample_repeats, warmup=0)
    for key, sec in t.items():
        name, omega = key.split("|")
        per_step = sec / sz.probe_steps
        floor = t_fwd["b"] if omega == "0" else t_fwd["2b"]
        out.setdefault(name, {})[f"omega_{omega}"] = {
            "step_s": r(per_step, 3),
            "step_vs_forward": r(per_step / floor, 3),
            "points_per_s": {str(n): r(b / (n * per_step), 3) for n in NFES},
        }
    out["proposed_shared_conditioning"] = shared_conditioning(net, b, sz.sample_repeats)
    log("sample: check the projection with a real 16-step rfm-s2 run")
    real = med(
        [
            timed(
                lambda: fams["rfm-s2"].sample(
                    net, cond, 1, SampleConfig(steps=16), torch.Generator().manual_seed(1)
                )
            )
            for _ in range(sz.sample_repeats)
        ]
    )
    projected = out["rfm-s2"]["omega_0"]["points_per_s"]["16"]
    out["check_rfm_s2_16nfe"] = {"measured_points_per_s": r(b / real, 3), "projected_points_per_s": projected}
    return out


# ----------------------------------------------------------------------------------------------- synthetic
def synthetic_model(family: str, steps: int, sz: Sizes, cache: Path) -> tuple[Geolocator, dict]:
    """Train (or reuse from ``cache``) a 128 × 3 model of ``family`` on the synthetic vMF-mixture task."""
    task = VmfMixtureTask.default()
    out_dir = cache / f"{family}-128x3-b256-{steps}"
    base = get_preset(f"small-{family}")
    cfg = dataclasses.replace(
        base,
        steps=steps,
        model=ModelConfig(dim=128, depth=3, expansion=4),
        data=dataclasses.replace(base.data, batch_size=256),
        optim=dataclasses.replace(base.optim, warmup_steps=100),
        log_every=100,
        eval_every=10 * steps,
        ckpt_every=10 * steps,
        device="cpu",
        dtype="fp32",
    )
    info: dict = {"steps": steps, "model": "128x3", "batch": 256, "train_rows": sz.synth_train_rows}
    state = out_dir / "train_state.pt"
    if state.exists() and (out_dir / "model.safetensors").exists():
        info["trained_in_this_run"] = False
    else:
        cond, xyz, _ = task.sample(sz.synth_train_rows, torch.Generator().manual_seed(100))
        log(f"synthetic: training {family} for {steps} steps")
        t = time.perf_counter()
        res = train(
            cfg, InMemoryBatches(cond, xyz, 256, seed=0), out_dir, cond.shape[1], progress=False, resume=False
        )
        info.update(
            trained_in_this_run=True,
            train_s=r(time.perf_counter() - t, 3),
            final_loss=r(res.history[-1]["loss"], 3),
        )
    return Geolocator.from_pretrained(out_dir), info


def test_set(sz: Sizes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cond, xyz, class) held out; the likelihood section uses its first ``sz.lik_points`` rows."""
    return VmfMixtureTask.default().sample(
        max(sz.quality_points, sz.lik_points), torch.Generator().manual_seed(7)
    )


def log_prob(
    geo: Geolocator, xyz: torch.Tensor, cond: torch.Tensor, cfg: LikelihoodConfig
) -> tuple[torch.Tensor, int, float]:
    t = time.perf_counter()
    lp = geo.log_prob(xyz, cond, cfg)
    return lp, int(geo.family.last_nfe), time.perf_counter() - t


def error_stats(lp: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (lp - ref).double()
    return {
        "mean_abs_nats": r(float(d.abs().mean()), 3),
        "max_abs_nats": r(float(d.abs().max()), 3),
        "mean_signed_nats": r(float(d.mean()), 3),
        "mean_abs_bits_per_dim": r(float(d.abs().mean()) / (3 * LN2), 3),
        "nll_bias_bits_per_dim": r(float(-d.mean()) / (3 * LN2), 3),
    }


# ----------------------------------------------------------------------------------------------- likelihood
def tangent_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis (e1, e2) of the tangent plane at each unit vector."""
    axis = torch.zeros_like(x)
    use_x = x[:, 2].abs() > 0.9
    axis[use_x, 0], axis[~use_x, 2] = 1.0, 1.0
    e1 = project(torch.linalg.cross(x, axis))
    return e1, torch.linalg.cross(x, e1)


def surface_divergence_2vjp(velocity, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PROPOSED: the surface divergence from 2 VJPs instead of 3 (the homogeneous field has J·x̂ = 0)."""
    field = homogeneous_tangent(velocity)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = field(xg, s)
        e1, e2 = tangent_basis(x)
        basis = torch.stack([e1, e2])
        (rows,) = torch.autograd.grad(out, xg, grad_outputs=basis, is_grads_batched=True)
    return out.detach(), (rows * basis).sum(-1).sum(0).detach()


def bench_likelihood_paper(sz: Sizes, net: torch.nn.Module) -> dict:
    """Seconds of one likelihood evaluation (field + exact divergence) vs a forward pass, paper size."""
    fam = make_family(FamilyConfig(name="rfm-s2"))
    m = sz.lik_batch
    g = torch.Generator().manual_seed(3)
    x, s, c = sample_uniform(m, g), torch.full((m,), 0.5), torch.randn(m, PAPER_COND, generator=g)
    vel = fam.velocity(net, c, 0.0)
    field = homogeneous_tangent(vel)
    log(f"likelihood: paper-size evaluation cost at {m} points")
    with torch.no_grad():
        t = interleaved(
            {
                "forward": lambda: net(x, s, c),
                "field_and_divergence": lambda: _field_and_divergence(field, x, s),
                "proposed_2vjp": lambda: surface_divergence_2vjp(vel, x, s),
            },
            sz.sample_repeats,
        )
    return {
        "points": m,
        "forward_s": r(t["forward"], 3),
        "eval_s": r(t["field_and_divergence"], 3),
        "eval_vs_forward": r(t["field_and_divergence"] / t["forward"], 3),
        "proposed_2vjp_eval_s": r(t["proposed_2vjp"], 3),
        "proposed_2vjp_vs_forward": r(t["proposed_2vjp"] / t["forward"], 3),
        "points_per_s_per_nfe": r(m / t["field_and_divergence"], 3),
    }


def velocity_roughness(geo: Geolocator, cond: torch.Tensor, xyz: torch.Tensor) -> dict:
    """How much v(x, s) moves when s moves by 1e-3 (relative): large values explain slow solver convergence.

    The network embeds 1000·s with sinusoids (docs/reference-behaviour.md §4.1), so v can oscillate in s with
    period ~6e-3.
    """
    fam = geo.family
    v = fam.velocity(geo.net, cond, 0.0)
    out = {}
    with torch.no_grad():
        for s0 in (0.1, 0.5, 0.9):
            s = torch.full((cond.shape[0],), s0)
            a, b = v(xyz, s), v(xyz, s + 1e-3)
            out[str(s0)] = r(float((a - b).norm(dim=-1).mean() / a.norm(dim=-1).mean()), 3)
    return out


def bench_likelihood_trained(sz: Sizes, geo: Geolocator, t_paper: dict | None) -> tuple[dict, dict]:
    cond, xyz, cls = (t[: sz.lik_points] for t in test_set(sz))
    task = VmfMixtureTask.default()
    log(f"likelihood: trained rfm-s2 reference (dopri5 {sz.ref_tol:g}) on {sz.lik_points} points")
    ref, ref_nfe, ref_s = log_prob(
        geo, xyz, cond, LikelihoodConfig(method="dopri5", rtol=sz.ref_tol, atol=sz.ref_tol)
    )
    rows = []
    configs = [LikelihoodConfig(method="dopri5", rtol=tol, atol=tol) for tol in sz.dopri_tols]
    configs += [LikelihoodConfig(method="rk4", steps=k) for k in (8, 16, 32, 64)]
    for cfg in configs:
        name = f"dopri5 rtol=atol={cfg.rtol:g}" if cfg.method == "dopri5" else f"rk4 {cfg.steps} steps"
        log(f"likelihood: {name}")
        lp, nfe, sec = log_prob(geo, xyz, cond, cfg)
        row = {
            "solver": name,
            "nfe": nfe,
            "seconds": r(sec, 3),
            "points_per_s": r(len(xyz) / sec, 3),
            "nll_bits_per_dim": r(float(-lp.mean()) / (3 * LN2), 4),
            **error_stats(lp, ref),
        }
        if t_paper:
            row["paper_network_points_per_s"] = r(t_paper["points_per_s_per_nfe"] / nfe, 3)
        rows.append(row)
    # The proposed 2-VJP divergence must equal the exact one: check on the trained field.
    vel = geo.family.velocity(geo.net, cond, 0.0)
    s = torch.rand(len(xyz), generator=torch.Generator().manual_seed(4)) * 0.98 + 0.01
    with torch.no_grad():
        _, d3 = _field_and_divergence(homogeneous_tangent(vel), xyz, s)
        _, d2 = surface_divergence_2vjp(vel, xyz, s)
    out = {
        "model": "rfm-s2 128x3 trained on tests.synthetic.VmfMixtureTask",
        "points": len(xyz),
        "reference": {
            "solver": f"dopri5 rtol=atol={sz.ref_tol:g}",
            "nfe": ref_nfe,
            "seconds": r(ref_s, 3),
            "nll_bits_per_dim": r(float(-ref.mean()) / (3 * LN2), 4),
        },
        "true_nll_bits_per_dim": r(task.nll_bits_per_dim(xyz, cls), 4),
        "rows": rows,
        "proposed_2vjp_divergence_max_abs_diff": r(float((d3 - d2).abs().max()), 3),
        "velocity_rel_change_per_1e-3_in_s": velocity_roughness(geo, cond, xyz),
    }
    return out, {"cond": cond, "xyz": xyz, "ref": ref}


# ----------------------------------------------------------------------------------------------- quality
def true_draws(cls: torch.Tensor, seed: int) -> torch.Tensor:
    """Fresh draws from the task's true conditional distribution for the given classes."""
    task = VmfMixtureTask.default()
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(task.log_w.exp()[cls], 1, generator=g).squeeze(-1)
    return vmf_sample(task.centres[cls, comp], task.kappa[cls, comp], g)


def energy_distance(a: torch.Tensor, b: torch.Tensor, cls: torch.Tensor) -> float:
    """Mean over classes of the (U-statistic) energy distance with chordal distances; 0 iff equal laws."""
    vals = []
    for k in cls.unique():
        x, y = a[cls == k].double(), b[cls == k].double()
        n, m = len(x), len(y)
        dxy = torch.cdist(x, y).mean()
        dxx = torch.cdist(x, x).sum() / (n * (n - 1))
        dyy = torch.cdist(y, y).sum() / (m * (m - 1))
        vals.append(float(2 * dxy - dxx - dyy))
    return sum(vals) / len(vals)


def dist_km(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return angle(a.double(), b.double()) * EARTH_RADIUS_KM


def bits(lp: torch.Tensor) -> torch.Tensor:
    """Per-item NLL in bits/dim from natural-log densities."""
    return -lp.double() / (3 * LN2)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of a − b and its standard error (a, b per-item values of the same items, same initial noise)."""
    d = (a - b).double()
    return float(d.mean()), float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0


def bench_quality_family(sz: Sizes, geo: Geolocator, name: str, ref_lp: dict | None) -> dict:
    task = VmfMixtureTask.default()
    cond, xyz, cls = test_set(sz)  # its first rows are the likelihood section's points
    m = sz.lik_points
    lcond, lxyz = cond[:m], xyz[:m]
    if ref_lp is not None and torch.equal(ref_lp["xyz"], lxyz):
        ref, ref_solver = ref_lp["ref"], f"dopri5 rtol=atol={sz.ref_tol:g}"
    else:
        log(f"quality {name}: dopri5 {sz.other_ref_tol:g} NLL reference")
        ref = log_prob(
            geo, lxyz, lcond, LikelihoodConfig(method="dopri5", rtol=sz.other_ref_tol, atol=sz.other_ref_tol)
        )[0]
        ref_solver = f"dopri5 rtol=atol={sz.other_ref_tol:g}"
    ref_nll = float(-ref.mean()) / (3 * LN2)
    fresh = true_draws(cls, seed=11)
    # Spread of the energy-distance estimate between two independent true sets of this size.
    ed_sd = statistics.stdev(
        energy_distance(true_draws(cls, seed=20 + 2 * i), true_draws(cls, seed=21 + 2 * i), cls)
        for i in range(8)
    )
    # A sample is an outlier if the true density there is below the 1% quantile of true draws' densities.
    big = cls.repeat(10)
    low = float(torch.quantile(task.log_prob(true_draws(big, seed=13), big).double(), 0.01))
    centre = task.centres[cls, task.log_w[cls].argmax(-1)]
    out: dict = {
        "points": len(xyz),
        "nll_points": m,
        "reference_context": {
            "true_nll_bits_per_dim": r(task.nll_bits_per_dim(lxyz, cls[:m]), 4),
            "true_draws_true_nll_bits_per_dim": r(task.nll_bits_per_dim(fresh, cls), 4),
            "true_draws_outlier_rate": r(float((task.log_prob(fresh, cls) < low).double().mean()), 3),
            "geoscore_of_a_true_draw": r(float(geoscore(dist_km(fresh, xyz).numpy()).mean()), 4),
            "geoscore_of_heaviest_mode_centre": r(float(geoscore(dist_km(centre, xyz).numpy()).mean()), 4),
            "energy_distance_noise_sd": r(ed_sd, 3),
            "model_nll_reference": {"solver": ref_solver, "bits_per_dim": r(ref_nll, 4)},
        },
        "rows": [],
    }
    base: dict = {}
    for method, steps in SETTINGS:
        nfe = steps * STAGES[method]
        row: dict = {"method": method, "steps": steps, "nfe": nfe}
        log(f"quality {name}: {method} {steps}")
        try:
            t = time.perf_counter()
            guided = geo.sample(
                cond, 1, omega=2.0, steps=steps, method=method, generator=torch.Generator().manual_seed(1)
            )[:, 0]
            free = geo.sample(
                cond, 1, omega=0.0, steps=steps, method=method, generator=torch.Generator().manual_seed(2)
            )[:, 0]
            row["sample_s"] = r(time.perf_counter() - t, 3)
            km = dist_km(guided, xyz)
            gs = torch.from_numpy(geoscore(km.numpy()))
            free_lp = task.log_prob(free, cls)
            base = base or {"gs": gs, "nll": bits(free_lp)}
            gs_d, gs_se = paired(gs, base["gs"])
            nll_d, nll_se = paired(bits(free_lp), base["nll"])
            row.update(
                {
                    "geoscore": r(float(gs.mean()), 4),
                    "mean_km": r(float(km.mean()), 4),
                    "geoscore_diff_vs_euler250": r(gs_d, 3),
                    "geoscore_diff_se": r(gs_se, 3),
                    "unguided_true_nll_bits_per_dim": r(float(bits(free_lp).mean()), 4),
                    "unguided_true_nll_diff_vs_euler250": r(nll_d, 3),
                    "unguided_true_nll_diff_se": r(nll_se, 3),
                    "unguided_outlier_rate": r(float((free_lp < low).double().mean()), 3),
                    "unguided_energy_distance": r(energy_distance(free, fresh, cls), 3),
                }
            )
        except ConfigError:
            row["sample"] = "n/a (diffusion samples with DDIM = euler only)"
        lp, lnfe, sec = log_prob(geo, lxyz, lcond, LikelihoodConfig(method=method, steps=steps))
        row.update(
            {
                "model_nll_bits_per_dim": r(float(-lp.mean()) / (3 * LN2), 4),
                "model_nll_minus_dopri5_bits_per_dim": r(float(-lp.mean()) / (3 * LN2) - ref_nll, 3),
                "likelihood_mean_abs_err_bits_per_dim": r(float((lp - ref).abs().mean()) / (3 * LN2), 3),
                "likelihood_nfe": lnfe,
                "likelihood_s": r(sec, 3),
            }
        )
        out["rows"].append(row)
    out["goal"] = goal_check(out["rows"], ed_sd)
    return out


GOAL_CRITERIA = {
    "sampling": "GeoScore of the guided draw (ω=2) not below Euler-250's by more than 2 standard errors "
    "of the paired difference (same initial noise), AND unguided samples not worse than Euler-250's by "
    "more than 2 paired standard errors in true-density NLL, AND energy distance to true draws ≤ "
    "Euler-250's + 2 sd of the estimator (sd from 8 pairs of independent true sets)",
    "likelihood": "|model NLL with this fixed-step solver − dopri5 NLL| ≤ "
    "max(Euler-250's error, 0.01 bits/dim)",
    "met": "some setting of ≤ 32 NFE meets the sampling criteria and some (possibly other) one the "
    "likelihood criterion (sampling and likelihood are separate calls with their own solver settings)",
}


def goal_check(rows: list[dict], ed_sd: float) -> dict:
    base = rows[0]
    tol = max(abs(base["model_nll_minus_dopri5_bits_per_dim"]), 0.01)
    sampling, likelihood, per = [], [], {}
    for row in rows[1:]:
        if row["nfe"] > 32:
            continue
        key = f"{row['method']}-{row['steps']}"
        checks = {"likelihood": abs(row["model_nll_minus_dopri5_bits_per_dim"]) <= tol}
        if checks["likelihood"]:
            likelihood.append(key)
        if "geoscore" in row and "geoscore" in base:
            checks["geoscore"] = row["geoscore_diff_vs_euler250"] >= -2 * row["geoscore_diff_se"]
            checks["unguided_nll"] = (
                row["unguided_true_nll_diff_vs_euler250"] <= 2 * row["unguided_true_nll_diff_se"]
            )
            checks["energy_distance"] = (
                row["unguided_energy_distance"] <= base["unguided_energy_distance"] + 2 * ed_sd
            )
            if checks["geoscore"] and checks["unguided_nll"] and checks["energy_distance"]:
                sampling.append(key)
        per[key] = checks
    return {
        "sampling_met_by": sampling,
        "likelihood_met_by": likelihood,
        "likelihood_tolerance_bits_per_dim": r(tol, 3),
        "met": bool(sampling and likelihood),
        "checks": per,
    }


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat: a smoke run of every section"
    )
    ap.add_argument("--sections", default="train,sample,likelihood,quality")
    ap.add_argument("--families", default="rfm-s2,flow-r3,diffusion-r3", help="families of the quality table")
    ap.add_argument("--cache-dir", type=Path, help="keep/reuse the synthetic models here")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine 2 threads ran 2-4x SLOWER; 0 = torch's "
        "default)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sz = QUICK if args.quick else Sizes()
    sections = set(args.sections.split(","))
    t0 = time.perf_counter()
    result: dict = {
        "bench": "core",
        "quick": args.quick,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "note": "shared machine: other processes were running; timings are medians of interleaved repeats",
    }
    tmp = tempfile.TemporaryDirectory(prefix="bench-core-")
    cache = args.cache_dir or Path(tmp.name)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        if "train" in sections:
            result["train"] = bench_train(sz)
        net = paper_network() if sections & {"sample", "likelihood"} else None
        if "sample" in sections:
            result["sample"] = bench_sample(sz, net)
        t_paper = None
        models: dict[str, tuple[Geolocator, dict]] = {}
        families = args.families.split(",") if "quality" in sections else []
        if "likelihood" in sections:
            t_paper = bench_likelihood_paper(sz, net)
            if "rfm-s2" not in families:
                families = ["rfm-s2", *families]
        del net
        for fam in families:
            models[fam] = synthetic_model(fam, sz.synth_steps.get(fam, 2000), sz, cache)
        ref_lp = None
        if "likelihood" in sections:
            geo, info = models["rfm-s2"]
            lik, ref_lp = bench_likelihood_trained(sz, geo, t_paper)
            result["likelihood"] = {"paper_network_eval": t_paper, "trained": {**lik, "training": info}}
        if "quality" in sections:
            result["quality"] = {"criteria": GOAL_CRITERIA}
            for fam in args.families.split(","):
                geo, info = models[fam]
                result["quality"][fam] = {
                    "training": info,
                    **bench_quality_family(sz, geo, fam, ref_lp if fam == "rfm-s2" else None),
                }
    finally:
        tmp.cleanup()
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
