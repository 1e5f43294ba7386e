"""Ours vs the reference, side by side in one process on the same weights: guided sampling at equal NFE.

Prints one JSON record: the machine (CPU model, avx2 / avx512_bf16 / amx flags, torch version, threads), and
per network size (512 × 12 paper, 256 × 6 small) and NFE (16, 32): points/s of

- ``reference``: the reference's loop (docs/reference-behaviour.md §7.3): per step ONE forward pass of the
  reference network on the concatenated batch (condition, zero condition), guidance ``(1+ω)·c − ω·u``, an
  ambient Euler step in the signal level and a projection onto the sphere. With ``PLONK_REPO`` set to a
  checkout of nicolas-dufour/plonk (needs ``einops``) the reference's own ``GeoAdaLNMLP`` class runs, loaded
  with our weights (same parameter names); without it our network runs the same loop (same multiply-adds).
- ``ours``: ``family.sample`` of ``rfm-s2`` with ``retraction="project"`` (the reference's step), which goes
  through ``solvers.guided`` → ``GeoAdaLNMLP.forward_guided`` (condition work once per call, null-branch
  modulation once per step, one stacked modulation GEMM).
- ``ours_int8``: the same with the block MLPs int8 (``network.quantize_dynamic_int8``).
- ``ours_distilled``: a guidance-distilled network (``geoloc.distill.GuidanceDistilled``) at the same ω: ONE
  student pass per step. The student has the teacher's architecture, so its speed does not depend on its
  weights: these rows use the benchmark weights as the student (their points are not compared with the
  reference's; the quality of real distillation is the ``distilled_quality`` section).
  ``ours_distilled_int8``: the student's block MLPs int8 as well.
- ``distilled_quality`` (section ``distill``): on bench_nfe's known 3-mode vMF task, a model trained there
  and distilled (``geoloc.distill.distill``), the GeoScore of one guided draw (ω = 2) per answer from the
  teacher's two-branch sampler, the student (and its int8 copy) at equal NFE from the same noise, with
  paired differences, answers/s and the median distance between teacher and student answers.

Every variant starts from the same noise, so ``max_angle_vs_reference_rad`` says whether the points agree
(fp32 rounding only for ``ours``). Runs are interleaved and repeated; figures are medians. One condition per
point (B points, B conditions). ``--quick`` (< 2 min) shrinks the batch and repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoloc.config import DistillConfig, FamilyConfig, SampleConfig
from geoloc.devices import cpu_info
from geoloc.distill import GuidanceDistilled, distill
from geoloc.families import make_family
from geoloc.network import GeoAdaLNMLP, NetworkConfig, quantize_dynamic_int8
from geoloc.sphere import angle


def machine(threads: int) -> dict:
    """The CPU record (:func:`geoloc.devices.cpu_info`) plus the threads this bench ran with and the load."""
    return {**cpu_info(), "torch_threads": threads, "loadavg": list(os.getloadavg())}


def _load_reference_network_class():
    """The reference's GeoAdaLNMLP from $PLONK_REPO without running its package __init__ (which pulls in the
    whole pipeline): stub packages point at the folders, then the two modules it needs are imported."""
    repo = os.environ.get("PLONK_REPO")
    if not repo:
        return None, "PLONK_REPO unset: our network in the reference's loop"
    root = Path(repo) / "plonk"
    try:
        for name, folder in [
            ("plonk", root),
            ("plonk.models", root / "models"),
            ("plonk.models.networks", root / "models" / "networks"),
        ]:
            if name not in sys.modules:
                pkg = types.ModuleType(name)
                pkg.__path__ = [str(folder)]
                sys.modules[name] = pkg
        spec = importlib.util.spec_from_file_location(
            "plonk.models.networks.mlp", root / "models/networks/mlp.py"
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod.GeoAdaLNMLP, f"reference class from {repo}"
    except Exception as exc:
        return None, f"reference import failed ({type(exc).__name__}: {exc}); our network in its loop"


def _sigmoid_signal(t: torch.Tensor, start: float = -7.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """The reference's SigmoidScheduler (docs/reference-behaviour.md §5.3), as the loop uses it (fp32, clamped
    at 1e-9)."""
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
    out = (-torch.sigmoid((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
    return out.clamp(1e-9, 1.0)


@torch.no_grad()
def reference_sample(net, x, cond, steps: int, omega: float, ref_api: bool) -> torch.Tensor:
    """The reference's riemannian_flow_sampler loop (docs/reference-behaviour.md §7.3), written out: two
    branches in one batch per step."""
    gammas = _sigmoid_signal(1 - torch.arange(steps + 1, dtype=torch.float32) / steps)
    stacked = torch.cat([cond, torch.zeros_like(cond)])
    for g_now, g_next in itertools.pairwise(gammas):
        y, gam = torch.cat([x, x]), g_now.expand(2 * x.shape[0])
        out = net({"y": y, "gamma": gam, "emb": stacked}) if ref_api else net(y, gam, stacked)
        c, u = out.chunk(2)
        x = x + (g_next - g_now) * ((1 + omega) * c - omega * u)
        x = x / x.norm(dim=-1, keepdim=True)
    return x


def _runs(family, ref, ref_api: bool, ours, int8, cond: torch.Tensor, cfg: SampleConfig) -> dict:
    """The samplers as thunks, each from the same initial noise (generator seed 2)."""
    n = cond.shape[0]

    def reference():
        x = family.prior_sample(n, torch.Generator().manual_seed(2), "cpu", torch.float32)
        return reference_sample(ref, x, cond, cfg.steps, cfg.omega, ref_api)

    def ours_run(net):
        return family.sample(net, cond, 1, cfg, generator=torch.Generator().manual_seed(2))[:, 0]

    distilled = GuidanceDistilled(ours, ours, cfg.omega)  # speed only: the student's cost is its architecture
    distilled_int8 = GuidanceDistilled(ours, int8, cfg.omega)
    return {
        "reference": reference,
        "ours": lambda: ours_run(ours),
        "ours_int8": lambda: ours_run(int8),
        "ours_distilled": lambda: ours_run(distilled),
        "ours_distilled_int8": lambda: ours_run(distilled_int8),
    }


def bench_sampling(sizes, nfes, batch: int, repeats: int, omega: float, draws: int = 1) -> dict:
    """``draws`` points per condition: 1 is the issue's one condition per point; n is how the best-answer
    estimators, top-k and calibration sample (n draws of one item), where our condition work is shared."""
    ref_cls, ref_source = _load_reference_network_class()
    family = make_family(FamilyConfig(name="rfm-s2"))
    out: dict = {
        "reference_source": ref_source,
        "batch_points": batch,
        "draws_per_condition": draws,
        "omega": omega,
        "results": [],
    }
    for dim, depth in sizes:
        torch.manual_seed(0)
        ours = GeoAdaLNMLP(NetworkConfig(dim=dim, depth=depth)).eval()
        with torch.no_grad():  # trained-like weights: the zero-initialised last layers made non-zero
            for blk in ours.blocks:
                blk.mlp[3].weight.normal_(0, 0.02)
                blk.mlp[3].bias.normal_(0, 0.02)
        ref = ours
        if ref_cls is not None:
            ref = ref_cls(3, dim, depth, 4, 1024).eval()
            ref.load_state_dict(ours.state_dict(), strict=True)
        int8 = quantize_dynamic_int8(ours)
        gen = torch.Generator().manual_seed(1)
        cond = torch.randn(max(batch // draws, 1), 1024, generator=gen).repeat_interleave(draws, dim=0)
        for nfe in nfes:
            points: dict[str, torch.Tensor] = {}
            cfg = SampleConfig(steps=nfe, omega=omega, method="euler", retraction="project")
            runs = _runs(family, ref, ref_cls is not None, ours, int8, cond, cfg)
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(repeats):
                for name, fn in runs.items():
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        points[name] = fn()
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rec = {"dim": dim, "depth": depth, "nfe": nfe}
            for k in times:
                rec[f"{k}_points_per_s"] = round(batch / med[k], 2)
            for k in times:
                if k != "reference":
                    rec[f"speedup_{k}"] = round(med["reference"] / med[k], 3)
            for k in ("ours", "ours_int8"):
                ang = angle(points[k].double(), points["reference"].double())
                rec[f"{k}_max_angle_vs_reference_rad"] = float(ang.max())
                rec[f"{k}_median_km_vs_reference"] = round(float(ang.median()) * 6371.0, 4)
            out["results"].append(rec)
            print(json.dumps(rec), file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------- training
# geoopt's float32 EPS: the expmap/logmap fall-backs and the acos clamp (docs/reference-behaviour.md §6.3)
_EPS32 = 1e-4


def _ref_expmap(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """geoopt Sphere.expmap as the reference uses it: cos/sin form, projx(x + u) below ‖u‖ = 1e-4."""
    norm_u = u.norm(dim=-1, keepdim=True)
    exp = x * torch.cos(norm_u) + u * torch.sin(norm_u) / norm_u
    retr = x + u
    retr = retr / retr.norm(dim=-1, keepdim=True)
    return torch.where(norm_u > _EPS32, exp, retr)


def _ref_logmap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """geoopt Sphere.logmap: proju(x, y − x) rescaled to dist = acos(clamp(x·y, ±(1 − 1e-4)))."""
    d = y - x
    u = d - (x * d).sum(-1, keepdim=True) * x
    dist = torch.acos((x * y).sum(-1, keepdim=True).clamp(-1 + _EPS32, 1 - _EPS32))
    return torch.where(dist > _EPS32, u * dist / u.norm(dim=-1, keepdim=True).clamp_min(_EPS32), u)


def _ref_target(x0: torch.Tensor, x1: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's RFM target: per sample (vmap), the geodesic path and its JVP in γ (torch.func)."""

    def cond_u(a, b, t):
        shoot = _ref_logmap(a, b)

        def path(tt):
            return _ref_expmap(a.unsqueeze(-2), torch.einsum("i,...k->...ik", tt, shoot))

        return torch.func.jvp(path, (t,), (torch.ones_like(t),))

    y, u = torch.func.vmap(cond_u)(x0, x1, gamma)
    return y.reshape(-1, 3), u.reshape(-1, 3)


class ReferenceTrainLoop:
    """The reference's per-step training work with in-memory batches, no Lightning around it
    (docs/reference-behaviour.md §6.3, §11).

    Per step: t ~ U(0,1), γ = sigmoid schedule(t), noise = normalised Gaussian, (y, u) by vmap-JVP through the
    geodesic, condition dropout 0.1, one forward of the reference network on its dict batch, loss
    mean(‖ψ − u‖²)/3, backward, ``torch.optim.AdamW`` as hydra builds it (lr 1e-3, wd 0.01, defaults: the
    single-tensor loop on CPU), the warm-up/cosine lr, and its EMA callback as it really runs: a Python loop
    over ``named_parameters()`` that lerps and copies into ``ema.state_dict()`` every step.
    """

    def __init__(self, net, cond: torch.Tensor, xyz: torch.Tensor, batch: int, ref_api: bool, total: int):
        import copy

        self.net, self.ref_api = net.train(), ref_api
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
        self.cond, self.xyz, self.batch, self.total = cond, xyz, batch, total
        self.step_i = 0

    def step(self) -> None:
        b, n = self.batch, self.cond.shape[0]
        start = (self.step_i * b) % (n - b + 1)
        cond = self.cond[start : start + b].clone()
        x1 = self.xyz[start : start + b]
        for g in (
            self.opt.param_groups
        ):  # WarmupCosineDecayLR (docs/reference-behaviour.md §11.3), stepped every optimiser step
            s = self.step_i
            g["lr"] = 1e-3 * (s / 500 if s < 500 else 0.5 * (1 + math.cos(math.pi * (s - 500) / self.total)))
        t = torch.rand(b)
        gamma = _sigmoid_signal(t).unsqueeze(-1)
        x0 = torch.randn(b, 3)
        x0 = x0 / x0.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            y, u = _ref_target(x0, x1, gamma)
        drop = torch.rand(b) < 0.1
        cond[drop] = torch.zeros_like(cond[drop])
        gam = gamma.squeeze(-1)
        out = self.net({"y": y, "gamma": gam, "emb": cond}) if self.ref_api else self.net(y, gam, cond)
        diff = out - u
        loss = (diff * diff).sum(-1).mean() / 3
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.step_i += 1
        with (
            torch.no_grad()
        ):  # EMACallback.update_ema, decay 0.999 (its lerp keeps 99.9 % of the new weights)
            ema_params = self.ema.state_dict()
            for name, param in itertools.chain(self.net.named_parameters(), self.net.named_buffers()):
                if name in ema_params and param.requires_grad:
                    ema_params[name].copy_(ema_params[name].detach().lerp(param.detach(), 0.999))


def _ours_train_config(dim: int, depth: int, batch: int, steps: int, store: str):
    from geoloc.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

    return TrainConfig(
        model=ModelConfig(dim=dim, depth=depth, expansion=4),
        family=FamilyConfig(name="rfm-s2"),
        optim=OptimConfig(name="adamw"),
        data=DataConfig(stores=(store,), split="train", batch_size=batch),
        steps=steps,
        device="cpu",
        dtype="fp32",
    )


def bench_training(sizes, steps: int, repeats: int, rows: int) -> dict:
    """``geoloc train`` end to end (``pipeline.train_job.run_train`` on a small store: loader, EMA, logging,
    final checkpoint, start-up) vs the reference loop over the same rows in memory; seconds per step."""
    import tempfile

    from geoloc.pipeline.eval_batches import read_tensors
    from geoloc.pipeline.train_job import run_train
    from tests.helpers import make_store

    ref_cls, ref_source = _load_reference_network_class()
    out: dict = {
        "reference_source": ref_source,
        "store_rows": rows,
        "results": [],
        "note": "seconds per step over a whole run; ours includes start-up, the loader, logging and the "
        "final checkpoint (checkpoint cadence 1000 steps, so only the final one in a short run)",
    }
    with tempfile.TemporaryDirectory(prefix="bench-speed-train-") as tmp:
        store = Path(tmp) / "store"
        make_store(store, rows, 1024, splits={"train": 1.0}, label_columns=(), shards=4, failures=0)
        cond, xyz = read_tensors([store], split="train")
        cond, xyz = cond.float(), xyz.float()
        for dim, depth, batch in sizes:
            steps_here = steps if dim * depth * batch <= 256 * 6 * 256 else max(4, steps // 5)
            times: dict[str, list[float]] = {"reference": [], "ours": []}
            for rep in range(repeats):
                for name in ("reference", "ours") if rep % 2 == 0 else ("ours", "reference"):
                    torch.manual_seed(0)
                    if name == "reference":
                        base = GeoAdaLNMLP(NetworkConfig(dim=dim, depth=depth))
                        net = base
                        if ref_cls is not None:
                            net = ref_cls(3, dim, depth, 4, 1024)
                            net.load_state_dict(base.state_dict(), strict=True)
                        loop = ReferenceTrainLoop(net, cond, xyz, batch, ref_cls is not None, 1_000_000)
                        t0 = time.perf_counter()
                        for _ in range(steps_here):
                            loop.step()
                    else:
                        cfg = _ours_train_config(dim, depth, batch, steps_here, str(store))
                        t0 = time.perf_counter()
                        run_train(cfg, Path(tmp) / f"run-{dim}-{rep}", resume=False, progress=False)
                    times[name].append((time.perf_counter() - t0) / steps_here)
            med = {k: statistics.median(v) for k, v in times.items()}
            rec = {
                "dim": dim,
                "depth": depth,
                "batch": batch,
                "steps_per_run": steps_here,
                "reference_s_per_step": round(med["reference"], 4),
                "ours_s_per_step": round(med["ours"], 4),
                "speedup_ours": round(med["reference"] / med["ours"], 3),
                "all_s_per_step": {k: [round(x, 4) for x in v] for k, v in times.items()},
            }
            out["results"].append(rec)
            print(json.dumps(rec), file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------- likelihood
def _sigmoid_signal_rate(
    t: torch.Tensor, start: float = -7.0, end: float = 3.0, tau: float = 1.0
) -> torch.Tensor:
    """d(signal)/dt of :func:`_sigmoid_signal` (the reference scheduler's ``derivative``)."""
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
    sig = torch.sigmoid((t * (end - start) + start) / tau)
    return -(end - start) * sig * (1 - sig) / (tau * (v_end - v_start))


def reference_log_prob(net, xyz: torch.Tensor, cond: torch.Tensor, ref_api: bool, tol: float = 1e-6):
    """The reference pipeline's likelihood ODE (docs/reference-behaviour.md §9.1), written out: state [x, ℓ]
    from t = 0 (data) to 1, dx/dt = γ'(t)·ψ(x, γ(t), c) in R³, dℓ/dt = trace of the full 3 × 3 Jacobian
    (``vmap(jacrev)``), torchdiffeq dopri5 at rtol = atol = ``tol``; x(1) projected, log p = −log 4π + ℓ(1).
    Returns (log p in nats, NFE)."""
    from torchdiffeq import odeint

    nfe = [0]

    def odefunc(t, state):
        nfe[0] += 1
        gamma = _sigmoid_signal(t.reshape(1))
        rate = _sigmoid_signal_rate(t.reshape(1))

        def vecfield(x, y):
            out = (
                net({"y": x, "gamma": gamma.reshape(-1), "emb": y})
                if ref_api
                else net(x.reshape(-1, 3), gamma.reshape(-1), y.reshape(-1, y.shape[-1]))
            )
            return rate * out

        x = state[..., :3]
        with torch.enable_grad():
            dx = vecfield(x, cond)
            jac = torch.func.vmap(torch.func.jacrev(vecfield, argnums=0))(x, cond)
        div = jac.reshape(-1, 3, 3).diagonal(dim1=-2, dim2=-1).sum(-1)
        return torch.cat([dx.reshape(-1, 3), div.reshape(-1, 1)], dim=-1).detach()

    state = torch.cat([xyz, torch.zeros_like(xyz[:, :1])], dim=-1)
    with torch.no_grad():
        end = odeint(odefunc, state, torch.tensor([0.0, 1.0]), rtol=tol, atol=tol, method="dopri5")[-1]
    return -math.log(4 * math.pi) + end[:, 3], nfe[0]


def bench_likelihood(dim: int, depth: int, points: int, repeats: int) -> dict:
    """Ours (``family.log_prob``, the default ``LikelihoodConfig``: rk4, fixed steps) vs the reference's
    dopri5 1e-6 full-Jacobian ODE, same weights and points; each against its own tight solution (ours: dopri5
    1e-8; the reference's: its ODE at 1e-9) for |Δ log p|, and ours vs the reference's tight value."""
    from geoloc.config import LikelihoodConfig

    ref_cls, ref_source = _load_reference_network_class()
    family = make_family(FamilyConfig(name="rfm-s2"))
    torch.manual_seed(0)
    ours = GeoAdaLNMLP(NetworkConfig(dim=dim, depth=depth)).eval()
    with torch.no_grad():
        for blk in ours.blocks:
            blk.mlp[3].weight.normal_(0, 0.02)
            blk.mlp[3].bias.normal_(0, 0.02)
    ref = ours
    if ref_cls is not None:
        ref = ref_cls(3, dim, depth, 4, 1024).eval()
        ref.load_state_dict(ours.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(5)
    xyz = torch.nn.functional.normalize(torch.randn(points, 3, generator=gen), dim=-1)
    cond = torch.randn(points, 1024, generator=gen)
    default = LikelihoodConfig()
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        lp_ref, nfe_ref = reference_log_prob(ref, xyz, cond, ref_cls is not None)
        times["reference"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lp_ours = family.log_prob(ours, xyz, cond, default)
        times["ours"].append(time.perf_counter() - t0)
        nfe_ours = family.last_nfe
    truth_ref, _ = reference_log_prob(ref, xyz, cond, ref_cls is not None, tol=1e-9)
    truth_ours = family.log_prob(ours, xyz, cond, LikelihoodConfig(method="dopri5", rtol=1e-8, atol=1e-8))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "reference_source": ref_source,
        "dim": dim,
        "depth": depth,
        "points": points,
        "ours_solver": f"{default.method} {default.steps} steps",
        "reference_solver": "dopri5 rtol=atol=1e-6",
        "reference_points_per_s": round(points / med["reference"], 3),
        "ours_points_per_s": round(points / med["ours"], 3),
        "speedup_ours": round(med["reference"] / med["ours"], 2),
        "reference_nfe": nfe_ref,
        "ours_nfe": nfe_ours,
        "reference_abs_err_nats_vs_own_tight": {
            "mean": float((lp_ref - truth_ref).abs().mean()),
            "max": float((lp_ref - truth_ref).abs().max()),
        },
        "ours_abs_err_nats_vs_own_tight": {
            "mean": float((lp_ours - truth_ours).abs().mean()),
            "max": float((lp_ours - truth_ours).abs().max()),
        },
        "ours_vs_reference_tight_nats": {
            "mean": float((lp_ours - truth_ref).abs().mean()),
            "max": float((lp_ours - truth_ref).abs().max()),
        },
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }


# ------------------------------------------------------------------------------------- distilled quality
def bench_distilled_quality(
    quick: bool, omega: float, nfes: tuple[int, ...], distill_steps: int | None
) -> dict:
    """Teacher (two branches) vs its guidance-distilled student (one pass) on bench_nfe's known task.

    The teacher is ``bench_nfe.train_model`` (its sizes; ``--quick``: bench_nfe's QUICK); it is distilled on
    the same training conditions and draws. One guided draw per answer, ``answers_per_condition`` answers
    per held-out condition, every sampler from the same noise; scores as bench_nfe (expected GeoScore
    against exact truth draws) with paired differences vs the teacher at the same NFE.
    """
    import tempfile

    import bench_nfe  # the known-density task and its scoring (imports this module: kept lazy)

    from geoloc.batches import InMemoryBatches

    sz = bench_nfe.QUICK if quick else bench_nfe.Sizes()
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        geo, info = bench_nfe.train_model(sz, Path(tmp) / "teacher")
    task = bench_nfe.KnownMixtures.draw(sz.train_conditions, seed=1)  # the teacher's training data
    k = sz.draws_per_train_condition
    xyz = task.sample(k, seed=2).reshape(-1, 3).float()
    cond = task.cond.repeat_interleave(k, dim=0)
    cfg = DistillConfig(
        omega=omega,
        steps=distill_steps or (400 if quick else 2000),
        batch_size=256,
        val_points=1024,
    )  # the other settings are DistillConfig's defaults (what `geoloc distill` uses)
    val_task = bench_nfe.KnownMixtures.draw(1024, seed=3)
    val = (val_task.cond, val_task.sample(1, seed=4)[:, 0].float())
    bench_nfe.log(f"distill: {cfg.steps} steps of {cfg.batch_size} points at ω={omega:g}")
    t0 = time.perf_counter()
    res = distill(geo.net, geo.family, InMemoryBatches(cond, xyz, cfg.batch_size, seed=1), cfg, val=val)
    distill_s = time.perf_counter() - t0
    nets = {
        "teacher": geo.net,
        "distilled": GuidanceDistilled(geo.net, res.student, omega),
        "distilled_int8": GuidanceDistilled(geo.net, quantize_dynamic_int8(res.student), omega),
    }
    ev = bench_nfe.KnownMixtures.draw(sz.eval_conditions, seed=7)
    truth = ev.sample(sz.truth_draws, seed=8)
    a = sz.answers_per_condition
    rows = []
    for nfe in nfes:
        scfg = SampleConfig(steps=nfe, omega=omega, method="euler")

        def runner(net, scfg=scfg):
            def fn(rows: slice, seed: int) -> torch.Tensor:
                gen = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    return geo.family.sample(net, ev.cond[rows], a, scfg, gen)

            return fn

        answers, seconds = bench_nfe.run_interleaved(
            {k: runner(v) for k, v in nets.items()}, ev.cond.shape[0], sz.chunk, seed=1000
        )
        base = bench_nfe.scores(answers["teacher"], truth)
        n_ans = ev.cond.shape[0] * a
        for name in nets:
            s = bench_nfe.scores(answers[name], truth)
            rec = {
                "sampler": name,
                "nfe": nfe,
                "geoscore": bench_nfe.r(float(s.mean()), 5),
                "geoscore_se": bench_nfe.r(float(s.std() / math.sqrt(len(s))), 3),
                "answers_per_s": bench_nfe.r(n_ans / seconds[name], 4),
                "speedup_vs_teacher": bench_nfe.r(seconds["teacher"] / seconds[name], 4),
            }
            if name != "teacher":
                rec.update({f"{k}_vs_teacher": v for k, v in bench_nfe.paired(s, base).items()})
                km = angle(answers[name].double(), answers["teacher"].double()) * 6371.0
                rec["median_km_to_teacher_answer"] = bench_nfe.r(float(km.median()), 3)
                rec["p90_km_to_teacher_answer"] = bench_nfe.r(float(km.quantile(0.9)), 3)
            rows.append(rec)
            print(json.dumps(rec), file=sys.stderr)
    return {
        "task": "bench_nfe.KnownMixtures (3 vMF modes per condition, κ 8-4096)",
        "teacher": info,
        "distill": {
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "sampler_steps": list(cfg.sampler_steps),
            "trajectory_fraction": cfg.trajectory_fraction,
            "seconds": round(distill_s, 1),
            "field_error_before": bench_nfe.r(res.field_error_before, 4),
            "field_error_after": bench_nfe.r(res.field_error_after, 4),
        },
        "eval_conditions": ev.cond.shape[0],
        "answers_per_condition": a,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--omega", type=float, default=2.0)
    ap.add_argument(
        "--sections", default="sampling,train", help="comma list: sampling, train, likelihood, distill"
    )
    ap.add_argument(
        "--draws-per-condition", type=int, default=1, help="sampling: points per condition (1, or e.g. 16)"
    )
    ap.add_argument("--distill-steps", type=int, default=None, help="distillation steps (400 quick, 2000)")
    ap.add_argument(
        "--train-sizes", default="small,paper", help="small = 256 × 6 batch 256, paper = 512 × 12 batch 1024"
    )
    ap.add_argument("--train-steps", type=int, default=None, help="steps per training run (default 40)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batch = args.batch or (64 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    nfes = (16,) if args.quick else (16, 32)
    sections = set(args.sections.split(","))
    record = {"bench": "speed", "quick": args.quick, "machine": machine(torch.get_num_threads())}
    if "sampling" in sections:
        sizes = [(512, 12), (256, 6)]
        record["sampling"] = bench_sampling(sizes, nfes, batch, repeats, args.omega, args.draws_per_condition)
    if "train" in sections:
        known = {"small": (256, 6, 256), "paper": (512, 12, 1024)}
        sizes = [known["small"]] if args.quick else [known[k] for k in args.train_sizes.split(",")]
        steps = args.train_steps or (10 if args.quick else 40)
        record["training"] = bench_training(sizes, steps, repeats if not args.quick else 1, 4096)
    if "likelihood" in sections:
        record["likelihood"] = bench_likelihood(256, 6, 16 if args.quick else 64, 1 if args.quick else 2)
    if "distill" in sections:
        record["distilled_quality"] = bench_distilled_quality(
            args.quick, args.omega, nfes, args.distill_steps
        )
    record["machine"]["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
