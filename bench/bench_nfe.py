"""Quality vs NFE on a known-density task: how few sampler steps give the reference's 250-step answer, and
how fast.

Prints ONE JSON record (progress goes to stderr) naming the machine (``bench_speed.machine``: CPU model and
flags, the kernel level ATen dispatches, whether bf16 is native, torch, threads).

- **Task** (:class:`KnownMixtures`): each condition is a mixture of 3 vMF modes on S² placed at 3 of 32 fixed
  anchors, each with one of four concentrations (κ 8 / 64 / 512 / 4096: angular spread ≈ 2,300 / 800 / 280 /
  100 km) and Dirichlet weights. The condition vector holds each mode's weight at the slot (anchor,
  concentration), so held-out conditions are new mixtures with a density known in closed form.
- **Model**: an RFM-S² network trained here through ``geoloc.train.train`` on in-memory batches of a few
  thousand conditions (``--quick``: smaller and shorter).
- **Scores**: per held-out condition, the GeoScore of an answer is its expected GeoScore against
  ``truth_draws`` exact draws of the true mixture (``estimators.expected_geoscore``), which removes most of
  the truth's sampling noise; ± is the standard error over conditions. Every answer of every setting starts
  from the same prior noise, so differences are paired (``diff_vs_*`` with their own standard error).
- **Protocols**: ``one_draw``: one guided draw (ω = 2) per answer, the paper's protocol. ``reference`` is the
  reference's sampler loop (``bench_speed.reference_sample``: per step one forward pass over the concatenated
  [cond; zero cond] batch, guidance, ambient Euler step, projection; 250 steps) on the reference's network
  class when ``PLONK_REPO`` is set, filled with our trained weights, else on our network. ``ours`` is
  ``Geolocator.sample`` (the checkpoint's exp retraction, one-pass ``forward_guided``) with each solver of
  ``geoloc.solvers.STEPPERS`` at NFE budgets 2-32 (NFE = steps × stages; one guided evaluation = 1 NFE).
  ``predict``: what ``geoloc predict`` answers by default (``PredictOptions``: the ``geoscore`` estimator over
  ``samples`` unguided draws, through ``Geolocator.predict``), at the same budgets and at 250 steps.
  ``predict_few_draws``: the same estimator over ``few_draws`` draws (Euler, every held-out condition), for
  the cheapest way to the reference's GeoScore.
- **Speed**: answers/s over the whole evaluation, with every setting run chunk by chunk in turn (a busy
  machine slows all alike); ``speedup_vs_reference`` = answers/s ÷ the reference's. ``within_noise`` (vs the
  reference, and for ``predict`` vs its own 250-step answer): mean paired difference ≥ −max(1 standard error,
  1 % of the baseline's GeoScore). ``summary`` gives, per protocol and solver, the smallest NFE from which
  every larger budget is within noise, its speed-up, and the ``predict`` steps that rule suggests.
- **Likelihood**: model NLL of held-out truth draws with the checkpoint's ``LikelihoodConfig`` vs a tight
  dopri5 solve, next to the true NLL.

    python bench/bench_nfe.py --quick                        # < 3 min on a loaded 2-core CPU
    PLONK_REPO=/path/to/plonk python bench/bench_nfe.py      # the reference's network class (needs einops)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_speed import _load_reference_network_class, machine, reference_sample  # noqa: E402

from geoloc.batches import InMemoryBatches  # noqa: E402
from geoloc.config import LikelihoodConfig, ModelConfig, PredictOptions  # noqa: E402
from geoloc.estimators import expected_geoscore  # noqa: E402
from geoloc.families import vmf_log_density, vmf_sample  # noqa: E402
from geoloc.files import atomic_write_text  # noqa: E402
from geoloc.geolocator import Geolocator  # noqa: E402
from geoloc.metrics import nll_bits_per_dim  # noqa: E402
from geoloc.presets import get_preset  # noqa: E402
from geoloc.solvers import STEPPERS  # noqa: E402
from geoloc.sphere import sample_uniform  # noqa: E402
from geoloc.train import train  # noqa: E402

OMEGA = 2.0  # the paper's guidance for one-draw answers
REFERENCE_STEPS = 250  # the reference's (and the paper's) sampler steps
NFE_BUDGETS = (2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything ``--quick`` shrinks."""

    dim: int = 128
    depth: int = 3
    train_steps: int = 3000
    train_conditions: int = 4096
    draws_per_train_condition: int = 32
    eval_conditions: int = 1024  # one-draw protocol
    answers_per_condition: int = 2  # one-draw answers per condition (different prior noise)
    predict_conditions: int = 48  # predict protocol (the first ones of the eval set)
    truth_draws: int = 128
    chunk: int = 256  # conditions per interleaved chunk (one-draw); predict uses PredictOptions.batch_size
    lik_points: int = 128
    few_draws: tuple[int, ...] = (4, 16)  # predict's estimator over fewer draws (Euler, whole eval set)
    tight_tol: float = 1e-7


QUICK = Sizes(
    train_steps=600,
    train_conditions=2048,
    draws_per_train_condition=16,
    eval_conditions=256,
    predict_conditions=8,
    truth_draws=64,
    lik_points=64,
    tight_tol=1e-6,
    few_draws=(16,),
)


def log(msg: str) -> None:
    print(f"[bench_nfe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def r(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (JSON readability)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(0, digits - 1 - math.floor(math.log10(abs(x)))))


# ------------------------------------------------------------------------------------------------ the task
@dataclasses.dataclass(frozen=True)
class KnownMixtures:
    """A set of conditions, each a 3-mode vMF mixture at known anchors, known concentrations and weights."""

    cond: torch.Tensor  # (N, anchors · levels)
    centres: torch.Tensor  # (N, 3, 3)
    kappa: torch.Tensor  # (N, 3)
    log_w: torch.Tensor  # (N, 3)

    ANCHORS = 32
    KAPPAS = (8.0, 64.0, 512.0, 4096.0)  # broad … concentrated
    MODES = 3
    COND_SCALE = 2.0

    @classmethod
    def draw(cls, n: int, seed: int) -> KnownMixtures:
        """``n`` random mixtures; the anchors are the same for every seed (fixed places)."""
        anchors = sample_uniform(cls.ANCHORS, torch.Generator().manual_seed(0)).double()
        g = torch.Generator().manual_seed(seed)
        which = torch.rand(n, cls.ANCHORS, generator=g).argsort(dim=1)[:, : cls.MODES]  # distinct anchors
        level = torch.randint(0, len(cls.KAPPAS), (n, cls.MODES), generator=g)
        w = -torch.rand(n, cls.MODES, generator=g, dtype=torch.float64).clamp_min(1e-12).log()  # Dirichlet(1)
        w = w / w.sum(dim=1, keepdim=True)
        cond = torch.zeros(n, cls.ANCHORS * len(cls.KAPPAS), dtype=torch.float64)
        cond.scatter_add_(1, which * len(cls.KAPPAS) + level, w * cls.COND_SCALE)
        kappa = torch.tensor(cls.KAPPAS, dtype=torch.float64)[level]
        return cls(cond.float(), anchors[which], kappa, w.log())

    def head(self, n: int) -> KnownMixtures:
        return KnownMixtures(self.cond[:n], self.centres[:n], self.kappa[:n], self.log_w[:n])

    def sample(self, k: int, seed: int) -> torch.Tensor:
        """``k`` exact draws per condition ``(N, k, 3)`` (float64)."""
        g = torch.Generator().manual_seed(seed)
        n = self.cond.shape[0]
        comp = torch.multinomial(self.log_w.exp(), k, replacement=True, generator=g)  # (N, k)
        mu = torch.gather(self.centres, 1, comp.unsqueeze(-1).expand(n, k, 3)).reshape(-1, 3)
        return vmf_sample(mu, torch.gather(self.kappa, 1, comp).reshape(-1), g).reshape(n, k, 3)

    def log_prob(self, xyz: torch.Tensor) -> torch.Tensor:
        """True log-density (nats per steradian) of one point per condition ``(N, 3)``."""
        comp = vmf_log_density(xyz.double().unsqueeze(1), self.centres, self.kappa)
        return torch.logsumexp(self.log_w + comp, dim=-1)

    def describe(self) -> dict:
        return {
            "modes_per_condition": self.MODES,
            "anchors": self.ANCHORS,
            "kappas": list(self.KAPPAS),
            "weights": "Dirichlet(1)",
            "cond_dim": self.cond.shape[1],
            "cond": f"weight × {self.COND_SCALE:g} at slot (anchor, concentration) of each mode",
        }


def train_model(sz: Sizes, out_dir: Path) -> tuple[Geolocator, dict]:
    """An RFM-S² model trained by ``geoloc.train.train`` on draws of ``sz.train_conditions`` mixtures."""
    task = KnownMixtures.draw(sz.train_conditions, seed=1)
    k = sz.draws_per_train_condition
    xyz = task.sample(k, seed=2).reshape(-1, 3).float()
    cond = task.cond.repeat_interleave(k, dim=0)
    base = get_preset("small-rfm-s2")
    cfg = dataclasses.replace(
        base,
        steps=sz.train_steps,
        model=ModelConfig(dim=sz.dim, depth=sz.depth, expansion=4),
        data=dataclasses.replace(base.data, batch_size=256),
        log_every=100,
        eval_every=10 * sz.train_steps,
        ckpt_every=10 * sz.train_steps,
        device="cpu",
        dtype="fp32",
    )
    log(f"train: rfm-s2 {sz.dim}×{sz.depth}, {sz.train_steps} steps of 256, {len(xyz)} rows")
    t = time.perf_counter()
    res = train(
        cfg, InMemoryBatches(cond, xyz, 256, seed=0), out_dir, cond.shape[1], progress=False, resume=False
    )
    info = {
        "family": "rfm-s2",
        "model": f"{sz.dim}x{sz.depth}",
        "batch": 256,
        "steps": sz.train_steps,
        "optimizer": cfg.optim.name,
        "train_conditions": sz.train_conditions,
        "train_rows": len(xyz),
        "train_s": r(time.perf_counter() - t, 3),
        "final_loss": r(res.history[-1]["loss"], 3),
    }
    return Geolocator.from_pretrained(out_dir), info


# ------------------------------------------------------------------------------------------------ running
def settings() -> list[tuple[str, int]]:
    """(method, steps) for every solver in ``STEPPERS`` and NFE budget it divides."""
    return [(m, nfe // st.nfe) for m, st in STEPPERS.items() for nfe in NFE_BUDGETS if nfe % st.nfe == 0]


def reference_network(geo: Geolocator) -> tuple[torch.nn.Module, bool, str]:
    """The reference's network class loaded with our trained weights (``PLONK_REPO``), else our network."""
    ref_cls, source = _load_reference_network_class()
    if ref_cls is None:
        return geo.net, False, source
    m = geo.config["model"]
    ref = ref_cls(3, m["dim"], m["depth"], m["expansion"], geo.cond_dim).eval()
    ref.load_state_dict(geo.net.state_dict(), strict=True)
    return ref, True, source


def run_interleaved(
    runners: dict[str, Callable[[slice, int], torch.Tensor]], n: int, chunk: int, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Run every runner on each chunk of conditions in turn; concatenated answers and total seconds each.

    Runner ``fn(rows, seed)`` answers conditions ``rows`` from a prior drawn by a generator seeded ``seed``
    (the same for every runner: paired answers).
    """
    answers: dict[str, list[torch.Tensor]] = {k: [] for k in runners}
    seconds = dict.fromkeys(runners, 0.0)
    for i, lo in enumerate(range(0, n, chunk)):
        rows = slice(lo, min(lo + chunk, n))
        for name, fn in runners.items():
            t = time.perf_counter()
            answers[name].append(fn(rows, seed + i))
            seconds[name] += time.perf_counter() - t
        log(f"  chunk {i + 1}/{math.ceil(n / chunk)} done")
    return {k: torch.cat(v) for k, v in answers.items()}, seconds


def scores(answers: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per condition: mean over its answers ``(N, a, 3)`` of the expected GeoScore against the truth draws."""
    return expected_geoscore(answers.double(), truth).mean(dim=1)


def paired(a: torch.Tensor, base: torch.Tensor) -> dict:
    """Mean paired difference a − base, its standard error, and whether it is within noise of the baseline."""
    d = (a - base).double()
    mean, se = float(d.mean()), float(d.std() / math.sqrt(len(d)))
    return {
        "diff": r(mean, 3),
        "diff_se": r(se, 3),
        "within_noise": mean >= -max(se, 0.01 * float(base.mean())),
    }


def row(
    name: str,
    method: str,
    steps: int,
    nfe: int,
    s: torch.Tensor,
    sec: float,
    count: int,
    ref_s: torch.Tensor,
    ref_rate: float,
) -> dict:
    rate = count / sec
    out = {
        "sampler": name,
        "method": method,
        "steps": steps,
        "nfe": nfe,
        "geoscore": r(float(s.mean()), 5),
        "geoscore_se": r(float(s.std() / math.sqrt(len(s))), 3),
        "answers_per_s": r(rate, 4),
        "speedup_vs_reference": r(rate / ref_rate, 4),
    }
    out.update({f"{k}_vs_reference": v for k, v in paired(s, ref_s[: len(s)]).items()})
    return out


def one_draw(geo: Geolocator, ev: KnownMixtures, truth: torch.Tensor, sz: Sizes) -> tuple[dict, torch.Tensor]:
    """The paper's protocol, one guided draw per answer; reference loop at 250 steps vs ours at budgets."""
    ref_net, ref_api, source = reference_network(geo)
    a = sz.answers_per_condition
    fam = geo.family

    def reference(rows: slice, seed: int) -> torch.Tensor:
        c = ev.cond[rows].repeat_interleave(a, dim=0)
        x = fam.prior_sample(c.shape[0], torch.Generator().manual_seed(seed), "cpu", torch.float32)
        return reference_sample(ref_net, x, c, REFERENCE_STEPS, OMEGA, ref_api).reshape(-1, a, 3)

    def ours(method: str, steps: int) -> Callable[[slice, int], torch.Tensor]:
        return lambda rows, seed: geo.sample(
            ev.cond[rows],
            a,
            omega=OMEGA,
            steps=steps,
            method=method,
            generator=torch.Generator().manual_seed(seed),
        )

    runners = {"reference": reference, f"euler-{REFERENCE_STEPS}": ours("euler", REFERENCE_STEPS)}
    runners |= {f"{m}-{k}": ours(m, k) for m, k in settings()}
    n = ev.cond.shape[0]
    log(f"one-draw: {len(runners)} samplers on {n} conditions × {a} answers")
    answers, seconds = run_interleaved(runners, n, sz.chunk, seed=1000)
    ref_s = scores(answers["reference"], truth)
    ref_rate = n * a / seconds["reference"]
    rows = [
        {
            "sampler": "reference",
            "method": "euler",
            "steps": REFERENCE_STEPS,
            "nfe": REFERENCE_STEPS,
            "geoscore": r(float(ref_s.mean()), 5),
            "geoscore_se": r(float(ref_s.std() / math.sqrt(n)), 3),
            "answers_per_s": r(ref_rate, 4),
            "speedup_vs_reference": 1.0,
        }
    ]
    for name in list(runners)[1:]:
        method, steps = name.rsplit("-", 1)
        rows.append(
            row(
                "ours",
                method,
                int(steps),
                int(steps) * STEPPERS[method].nfe,
                scores(answers[name], truth),
                seconds[name],
                n * a,
                ref_s,
                ref_rate,
            )
        )
    return {
        "reference_source": source,
        "reference_protocol": f"one guided draw (ω={OMEGA:g}), "
        f"{REFERENCE_STEPS} Euler steps, the reference's two-branch loop (bench_speed.reference_sample)",
        "answers_per_condition": a,
        "conditions": n,
        "rows": rows,
    }, ref_s


def predict_protocol(
    geo: Geolocator,
    ev: KnownMixtures,
    truth: torch.Tensor,
    ref_s: torch.Tensor,
    ref_rate: float,
    samples: int = PredictOptions.samples,
    methods: tuple[str, ...] = tuple(STEPPERS),
) -> dict:
    """``geoloc predict``'s default answer (its estimator over ``samples`` draws) at each solver setting.

    With predict's own number of draws, also at 250 steps (the baseline of its default steps).
    """
    opts = PredictOptions()
    base_cfg = geo.sample_config

    def ours(method: str, steps: int) -> Callable[[slice, int], torch.Tensor]:
        def fn(rows: slice, seed: int) -> torch.Tensor:
            # Geolocator.predict takes its solver method from sample_config
            geo.sample_config = dataclasses.replace(base_cfg, method=method)
            try:
                pred = geo.predict(
                    ev.cond[rows],
                    estimator=opts.estimator,
                    n=samples,
                    omega=opts.omega,
                    steps=steps,
                    generator=torch.Generator().manual_seed(seed),
                )
            finally:
                geo.sample_config = base_cfg
            return pred.xyz.unsqueeze(1)

        return fn

    base_name = f"euler-{REFERENCE_STEPS}"
    runners = {base_name: ours("euler", REFERENCE_STEPS)} if samples == opts.samples else {}
    runners |= {f"{m}-{k}": ours(m, k) for m, k in settings() if m in methods}
    n = ev.cond.shape[0]
    log(
        f"predict: estimator {opts.estimator!r} over {samples} draws, {len(runners)} samplers, {n} conditions"
    )
    answers, seconds = run_interleaved(runners, n, opts.batch_size, seed=5000)
    base = scores(answers[base_name], truth) if base_name in answers else None
    rows = []
    for name in runners:
        method, steps = name.rsplit("-", 1)
        s = scores(answers[name], truth)
        rec = row(
            "ours",
            method,
            int(steps),
            int(steps) * STEPPERS[method].nfe,
            s,
            seconds[name],
            n,
            ref_s,
            ref_rate,
        )
        if base is not None:
            rec.update({f"{k}_vs_euler{REFERENCE_STEPS}": v for k, v in paired(s, base).items()})
        rows.append(rec)
    return {
        "estimator": opts.estimator,
        "samples": samples,
        "omega": opts.omega,
        "batch_size": opts.batch_size,
        "conditions": n,
        "checkpoint_method": base_cfg.method,
        "rows": rows,
    }


def smallest_within(rows: list[dict], key: str) -> dict:
    """Per method: the smallest NFE from which every larger budget (≤ 32) is within noise, with its row."""
    out = {}
    for method in STEPPERS:
        mine = sorted(
            (x for x in rows if x["method"] == method and x["nfe"] <= max(NFE_BUDGETS)),
            key=lambda x: x["nfe"],
        )
        pick = None
        for x in reversed(mine):
            if not x[key]:
                break
            pick = x
        out[method] = (
            None
            if pick is None
            else {
                "nfe": pick["nfe"],
                "steps": pick["steps"],
                "geoscore": pick["geoscore"],
                "speedup_vs_reference": pick["speedup_vs_reference"],
            }
        )
    return out


def likelihood(geo: Geolocator, ev: KnownMixtures, truth: torch.Tensor, sz: Sizes) -> dict:
    """Model NLL of one held-out truth draw per condition: the checkpoint's default solver, a tight dopri5."""
    m = min(sz.lik_points, ev.cond.shape[0])
    x, c = truth[:m, 0].float(), ev.cond[:m]
    out = {
        "points": m,
        "true_nll_bits_per_dim": r(nll_bits_per_dim(ev.head(m).log_prob(truth[:m, 0])).bits_per_dim, 5),
    }
    lps = {}
    tight = LikelihoodConfig(method="dopri5", rtol=sz.tight_tol, atol=sz.tight_tol)
    for name, cfg in (("default", geo.likelihood_config), ("tight", tight)):
        log(f"likelihood: {name} {cfg.method}")
        t = time.perf_counter()
        lps[name] = geo.log_prob(x, c, cfg).double()
        sec = time.perf_counter() - t
        label = (
            f"dopri5 rtol=atol={cfg.rtol:g}" if cfg.method == "dopri5" else f"{cfg.method} {cfg.steps} steps"
        )
        out[name] = {
            "solver": label,
            "nfe": int(geo.family.last_nfe),
            "seconds": r(sec, 3),
            "points_per_s": r(m / sec, 3),
            "nll_bits_per_dim": r(nll_bits_per_dim(lps[name]).bits_per_dim, 5),
        }
    d = lps["default"] - lps["tight"]
    out["default_minus_tight"] = {
        "mean_abs_nats": r(float(d.abs().mean()), 3),
        "max_abs_nats": r(float(d.abs().max()), 3),
        "nll_bias_bits_per_dim": r(float(-d.mean()) / (3 * math.log(2)), 3),
    }
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller task, shorter training (< 3 min)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine 2 threads ran 2-4x SLOWER; 0 = "
        "torch's default)",
    )
    ap.add_argument("--model-dir", type=Path, help="keep/reuse the trained model here (else a temp dir)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sz = QUICK if args.quick else Sizes()
    t0 = time.perf_counter()
    result: dict = {
        "bench": "nfe",
        "quick": args.quick,
        "machine": machine(torch.get_num_threads()),
        "sizes": dataclasses.asdict(sz),
    }
    with tempfile.TemporaryDirectory(prefix="bench-nfe-") as tmp:
        out_dir = args.model_dir or Path(tmp) / "rfm-s2"
        info_file = out_dir / "bench_nfe_training.json"
        if (out_dir / "model.safetensors").exists() and info_file.exists():
            geo = Geolocator.from_pretrained(out_dir)
            info = {**json.loads(info_file.read_text()), "trained_in_this_run": False}
        else:
            geo, info = train_model(sz, out_dir)
            atomic_write_text(info_file, json.dumps(info))
        ev = KnownMixtures.draw(sz.eval_conditions, seed=7)
        truth = ev.sample(sz.truth_draws, seed=8)
        result["task"] = {
            **ev.describe(),
            "train_conditions": sz.train_conditions,
            "eval_conditions": sz.eval_conditions,
            "truth_draws_per_condition": sz.truth_draws,
            "geoscore_of_a_true_draw": r(float(scores(ev.sample(1, seed=9), truth).mean()), 5),
        }
        result["training"] = info
        result["one_draw"], ref_s = one_draw(geo, ev, truth, sz)
        ref_rate = result["one_draw"]["rows"][0]["answers_per_s"]
        p = sz.predict_conditions
        result["predict"] = predict_protocol(geo, ev.head(p), truth[:p], ref_s[:p], ref_rate)
        result["predict_few_draws"] = [
            predict_protocol(geo, ev, truth, ref_s, ref_rate, samples=k, methods=("euler",))
            for k in sz.few_draws
        ]
        result["likelihood"] = likelihood(geo, ev, truth, sz)
    candidates = [{**x, "protocol": "one guided draw"} for x in result["one_draw"]["rows"][1:]]
    for p in [result["predict"], *result["predict_few_draws"]]:
        candidates += [
            {**x, "protocol": f"{p['estimator']} estimator over {p['samples']} draws"} for x in p["rows"]
        ]
    best = max(
        (x for x in candidates if x["within_noise_vs_reference"] and x["nfe"] <= max(NFE_BUDGETS)),
        key=lambda x: x["speedup_vs_reference"],
        default=None,
    )
    steps = smallest_within(result["predict"]["rows"], f"within_noise_vs_euler{REFERENCE_STEPS}")
    method = result["predict"]["checkpoint_method"]
    result["summary"] = {
        "criterion": "within noise: mean paired GeoScore difference ≥ −max(1 standard error, 1 % of the "
        "baseline's GeoScore); smallest NFE = the smallest budget from which every larger one "
        "(≤ 32) is within noise",
        "reference_geoscore": result["one_draw"]["rows"][0]["geoscore"],
        "one_draw_smallest_nfe_within_noise_of_reference": smallest_within(
            result["one_draw"]["rows"], "within_noise_vs_reference"
        ),
        "predict_smallest_nfe_within_noise_of_reference": smallest_within(
            result["predict"]["rows"], "within_noise_vs_reference"
        ),
        "predict_smallest_nfe_within_noise_of_its_250_steps": steps,
        "few_draws_smallest_nfe_within_noise_of_reference": {
            p["samples"]: smallest_within(p["rows"], "within_noise_vs_reference")["euler"]
            for p in result["predict_few_draws"]
        },
        "suggested_predict_steps": None if steps.get(method) is None else steps[method]["steps"],
        "best_speedup_at_reference_quality": best,
        "goal_30x_met": bool(best and best["speedup_vs_reference"] >= 30),
    }
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
