"""Does the hybrid (flow + neighbour kernels) beat retrieval and the flow? And what does its index cost?

Three parts, one JSON object on stdout:

- ``demo``: on the demo's held-out places (the ``test`` split, restricted by default to the 30,000-name
  subsample ``geoloc demo`` embeds, i.e. its 1,503 test names), rows: the flow with one guided draw (paper
  protocol, ω = 2), the flow's best estimator (max expected GeoScore of ``--n`` draws), 1-NN retrieval,
  weighted-neighbour retrieval (k, τ chosen on validation by GeoScore), and the hybrid (max expected GeoScore
  over its draws ∪ neighbours). Columns: GeoScore, mean km, country / region / city accuracy (the published
  label rule: ``geoloc.metrics.score`` with the gazetteer), NLL in bits/dim, and on ``--calib-items`` items
  the coverage of the 50/90/95% regions, the calibration error and the median 50/90% region areas.
  The hybrid is fitted (``geoloc.pipeline.fit_hybrid``) on a validation slice carved from train
  (``--val-where``) that the flow's training excluded; the test split is never used to choose anything.
- ``synthetic``: a known conditional density (vMF mixtures per class, features = class embedding + noise):
  the oracle's NLL, a uniform "flow" and the hybrid on top of it fitted on validation items — NLL, coverage,
  and the retrieval rows.
- ``index``: faiss build time, bytes per item and query time on random vectors (``--index-rows`` × 384),
  per million items, and projected to OSV-5M (4.9M × 1024) by the measured bytes per dimension.

Run from the repository root: ``python bench/bench_hybrid.py --store demo_out/store --flow demo_out/rfm-s2``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geoloc.calibration import calibration_error, coverage, hdr_levels, region_area_km2  # noqa: E402
from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig  # noqa: E402
from geoloc.devices import cpu_info  # noqa: E402
from geoloc.estimators import max_expected_geoscore  # noqa: E402
from geoloc.geolocator import Geolocator  # noqa: E402
from geoloc.hybrid import ExactNeighbours, HybridGeolocator, fit_hybrid_params, mixture_log_prob  # noqa: E402
from geoloc.metrics import nll_bits_per_dim, score  # noqa: E402
from geoloc.retrieval import fit_weighted_retrieval, nearest_neighbour, weighted_retrieval  # noqa: E402
from geoloc.sphere import xyz_to_latlon  # noqa: E402


def _row(pred_xyz, truth_latlon, gaz, levels, gt_keys) -> dict:
    ll = xyz_to_latlon(pred_xyz.double()).numpy()
    sc = score(ll, truth_latlon, gazetteer=gaz, levels=levels, gt_keys=gt_keys).as_dict()
    keep = ("geoscore", "dist_km", "median_km", "acc_country", "acc_region", "acc_city")
    return {k: float(sc[k]) for k in keep if k in sc}


def _calib(sample_lp: torch.Tensor, true_lp: torch.Tensor) -> dict:
    lv = hdr_levels(sample_lp, true_lp)
    cov = coverage(lv)
    return {
        "coverage_50": cov[0.5],
        "coverage_90": cov[0.9],
        "coverage_95": cov[0.95],
        "calibration_error": calibration_error(lv),
        "median_area50_km2": float(np.median(region_area_km2(sample_lp, 0.5))),
        "median_area90_km2": float(np.median(region_area_km2(sample_lp, 0.9))),
        "items": len(lv),
    }


def demo_ids(limit: int, total_rows: int = 144_563) -> set[str]:
    """The ids ``geoloc demo --limit`` embeds: the smallest ``limit`` subsample hashes (readers.py's rule)."""
    from geoloc.pipeline.readers import unit_hash

    ids = (f"gn-{i:06d}" for i in range(1, total_rows + 1))
    return set(heapq.nsmallest(limit, ids, key=lambda i: unit_hash(i, b"subsample")))


def bench_demo(args) -> dict:
    from geoloc.gazetteer import LEVELS, Gazetteer
    from geoloc.pipeline.fit_hybrid import (
        FitHybridConfig,
        fit_hybrid,
        flow_log_prob_at,
        load_hybrid,
        read_items,
    )

    torch.manual_seed(0)
    out: dict = {}
    lik = LikelihoodConfig(steps=args.lik_steps)
    hybrid_dir = Path(args.hybrid_out)
    t0 = time.perf_counter()
    if not (hybrid_dir / "hybrid.json").exists() or args.refit:
        cfg = FitHybridConfig(
            val_split="train", val_where=args.val_where, max_val=args.max_val, likelihood=lik
        )
        fit_hybrid(args.flow, [args.store], hybrid_dir, cfg, log=lambda m: print(m, file=sys.stderr))
    out["fit_s"] = time.perf_counter() - t0
    h = load_hybrid(hybrid_dir)
    out["hybrid_json"] = {k: h.info[k] for k in ("params", "fitted_on", "retrieval") if k in h.info}
    out["hybrid_json"]["retrieval"] = {k: v for k, v in h.info["retrieval"].items() if k != "grid"}
    out["hybrid_json"]["fit"] = {k: v for k, v in h.info["fit"].items() if k != "per_k"}
    cols = [f"unique_{lv}" for lv in LEVELS]
    test = read_items([args.store], "test", label_columns=cols)
    if args.demo_limit:
        keep = demo_ids(args.demo_limit)
        sel = np.asarray([i in keep for i in test.ids])
        test.ids = [i for i, k in zip(test.ids, sel, strict=True) if k]
        test.cond, test.xyz, test.latlon = test.cond[sel], test.xyz[sel], test.latlon[sel]
        test.labels = {c: v[sel] for c, v in test.labels.items()}
    if args.max_test:
        n = args.max_test
        test.ids, test.cond, test.xyz, test.latlon = (
            test.ids[:n],
            test.cond[:n],
            test.xyz[:n],
            test.latlon[:n],
        )
        test.labels = {c: v[:n] for c, v in test.labels.items()}
    out["test_items"] = len(test.ids)
    gaz = Gazetteer.load(table=False)
    levels = list(LEVELS)
    gt_keys = {lv: test.labels[f"unique_{lv}"] for lv in levels}
    flow = h.flow
    p = h.params
    rk, rtau = h.info["retrieval"]["k"], h.info["retrieval"]["tau"]
    kmax = max(p.search_k, rk, 64)
    nb_all = h.index.search(test.cond, kmax)
    nb = nb_all.head(p.search_k)
    rows: dict = {}
    timing: dict = {}
    g = torch.Generator().manual_seed(0)

    t = time.perf_counter()
    flow.sample_config = replace(flow.sample_config, steps=args.one_draw_steps)
    one = flow.predict(test.cond, estimator="sample", generator=g).xyz
    timing["flow_one_draw_s"] = time.perf_counter() - t
    rows[f"flow, one guided draw (paper, {args.one_draw_steps} steps)"] = _row(
        one, test.latlon, gaz, levels, gt_keys
    )

    t = time.perf_counter()
    draws = flow.sample(test.cond, args.n, omega=0.0, steps=args.steps, generator=g)
    timing["flow_draws_s"] = time.perf_counter() - t
    best = max_expected_geoscore(draws)
    rows[f"flow, max expected GeoScore ({args.n} draws, {args.steps} steps)"] = _row(
        best, test.latlon, gaz, levels, gt_keys
    )
    rows["retrieval, 1-NN"] = _row(nearest_neighbour(nb_all.xyz), test.latlon, gaz, levels, gt_keys)
    rows[f"retrieval, weighted (k={rk}, tau={rtau:g}, max expected GeoScore)"] = _row(
        weighted_retrieval(nb_all.xyz, nb_all.sim, rtau, rk), test.latlon, gaz, levels, gt_keys
    )
    t = time.perf_counter()
    hyb = h.geoscore_answer(test.cond, neighbours=nb, flow_samples=draws, answer_k=p.k, answer_tau=p.tau)
    timing["hybrid_answer_s"] = time.perf_counter() - t + timing["flow_draws_s"]
    rows["hybrid, likelihood weights, max expected GeoScore (draws ∪ neighbours)"] = _row(
        hyb, test.latlon, gaz, levels, gt_keys
    )
    # The same mixture answer, with the neighbour part weighted as the retrieval row (k, τ chosen on
    # validation by GeoScore) and the flow's share λ(c) from the likelihood fit.
    hyb_r = h.geoscore_answer(
        test.cond,
        neighbours=nb_all.head(max(p.search_k, rk)),
        flow_samples=draws,
        answer_k=rk,
        answer_tau=rtau,
    )
    rows["hybrid (default), answer weights of the retrieval fit"] = _row(
        hyb_r, test.latlon, gaz, levels, gt_keys
    )

    t = time.perf_counter()
    flow_lp = flow_log_prob_at(flow, test.cond, test.xyz, lik)
    timing["flow_nll_s"] = time.perf_counter() - t
    hyb_lp = mixture_log_prob(flow_lp[:, None], test.xyz[:, None], nb, p)[:, 0]
    for name in rows:
        rows[name]["nll_bits_per_dim"] = None
    flow_nll = nll_bits_per_dim(flow_lp.numpy()).bits_per_dim
    hyb_nll = nll_bits_per_dim(hyb_lp.numpy()).bits_per_dim
    for name in rows:
        if name.startswith("flow"):
            rows[name]["nll_bits_per_dim"] = flow_nll
        if name.startswith("hybrid"):
            rows[name]["nll_bits_per_dim"] = hyb_nll

    c = min(args.calib_items, len(test.ids))
    t = time.perf_counter()
    cond_c = test.cond[:c]
    fam = flow.family
    flat = cond_c.repeat_interleave(args.calib_n, 0)
    xs = fam.sample_exact(flow.net, flat, lik, g)
    xs = xs / xs.norm(dim=-1, keepdim=True)
    lps = flow.log_prob(xs, flat, lik).reshape(c, args.calib_n)
    calib = {"flow": _calib(lps, flow_lp[:c])}
    timing["flow_calibration_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _, hlps = h.sample_with_log_prob(cond_c, args.calib_n, generator=g, neighbours=nb.rows(slice(0, c)))
    calib["hybrid"] = _calib(hlps, hyb_lp[:c])
    timing["hybrid_calibration_s"] = time.perf_counter() - t
    for name in rows:
        key = "flow" if name.startswith("flow") else "hybrid" if name.startswith("hybrid") else None
        if key:
            rows[name].update({k: v for k, v in calib[key].items() if k != "items"})
    out.update(
        {"rows": rows, "calibration_items": c, "calibration_samples": args.calib_n, "timing_s": timing}
    )
    return out


def bench_synthetic(args) -> dict:
    """Known density: class c → 2-component vMF mixture; features = class embedding + noise."""
    g = torch.Generator().manual_seed(1)
    classes, dim = 300, 32
    centres = torch.nn.functional.normalize(torch.randn(classes, 2, 3, generator=g), dim=-1)
    kappa = 10 ** (1.5 + 2.0 * torch.rand(classes, 2, generator=g))  # 30 … 3,000 per steradian
    log_w = torch.log_softmax(torch.randn(classes, 2, generator=g), dim=-1)
    emb = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1)

    def draw(n: int):
        from geoloc.families import vmf_sample

        c = torch.randint(0, classes, (n,), generator=g)
        comp = torch.multinomial(log_w.exp()[c], 1, generator=g)[:, 0]
        x = vmf_sample(centres[c, comp], kappa[c, comp], g)
        f = emb[c] + 0.35 * torch.randn(n, dim, generator=g) / math.sqrt(dim)
        return f, x, c

    def true_lp(x, c):
        from geoloc.families import vmf_log_density

        return torch.logsumexp(log_w[c] + vmf_log_density(x.unsqueeze(1), centres[c], kappa[c]), -1)

    tr_f, tr_x, _ = draw(30000)
    va_f, va_x, _ = draw(2000)
    te_f, te_x, te_c = draw(3000)
    db = ExactNeighbours(tr_f, tr_x)
    flow = Geolocator.build(FamilyConfig(name="uniform"), ModelConfig(), cond_dim=dim)
    va_nb = db.search(va_f, 64)
    fit = fit_hybrid_params(torch.full((len(va_x),), -math.log(4 * math.pi)), va_x, va_nb, (4, 8, 16, 32, 64))
    ret = fit_weighted_retrieval(va_nb.xyz, va_nb.sim, va_x)
    h = HybridGeolocator(flow, db, fit.params)
    nb = db.search(te_f, 64)
    te_ll = xyz_to_latlon(te_x.double()).numpy()
    rows = {
        "retrieval, 1-NN": _row(nearest_neighbour(nb.xyz), te_ll, None, [], None),
        f"retrieval, weighted (k={ret['k']}, tau={ret['tau']:g})": _row(
            weighted_retrieval(nb.xyz, nb.sim, ret["tau"], ret["k"]), te_ll, None, [], None
        ),
    }
    gen = torch.Generator().manual_seed(2)
    hyb = h.predict(te_f, n=16, generator=gen, neighbours=nb).xyz
    rows["hybrid (uniform flow)"] = _row(hyb, te_ll, None, [], None)
    lp_h = h.log_prob(te_x, te_f, neighbours=nb.head(fit.params.k))
    rows["hybrid (uniform flow)"]["nll_bits_per_dim"] = nll_bits_per_dim(lp_h.numpy()).bits_per_dim
    c = 1000
    _, hl = h.sample_with_log_prob(te_f[:c], 256, generator=gen, neighbours=nb.rows(slice(0, c)))
    rows["hybrid (uniform flow)"].update(_calib(hl, lp_h[:c]))
    return {
        "task": f"{classes} classes × 2 vMF (κ 30–3000), features = class embedding + noise, 30k train",
        "oracle_nll_bits_per_dim": nll_bits_per_dim(true_lp(te_x, te_c).numpy()).bits_per_dim,
        "uniform_nll_bits_per_dim": nll_bits_per_dim(np.full(3, -math.log(4 * math.pi))).bits_per_dim,
        "fitted": fit.params.to_json(),
        "rows": rows,
    }


def bench_index(args) -> dict:
    import faiss

    from geoloc.pipeline.neighbours import NeighbourIndex

    rng = np.random.default_rng(0)
    n, d = args.index_rows, 384
    x = rng.standard_normal((n, d), dtype=np.float32)
    xyz = np.zeros((n, 3), dtype=np.float32)
    xyz[:, 2] = 1
    q = torch.from_numpy(rng.standard_normal((1000, d), dtype=np.float32))
    out = {"rows": n, "dim": d}
    for kind in ("flat", "ivf-sq8", "ivf-pq"):
        idx = NeighbourIndex.from_arrays(x, xyz, kind=kind)
        size = len(faiss.serialize_index(idx.index))
        t = time.perf_counter()
        idx.search(q, 64)
        qs = time.perf_counter() - t
        per_item = size / n
        out[kind] = {
            "factory": idx.meta["factory"],
            "build_s": idx.meta["build_s"],
            "build_s_per_million": idx.meta["build_s"] * 1e6 / n,
            "bytes_per_item": per_item,
            "gb_per_million": per_item * 1e6 / 1e9,
            "query_ms_per_1k_k64": qs * 1000,
            # memory scales with dimension for these codecs: projected to OSV-5M's 4.9M × 1024 features
            "osv5m_gb_projected": (per_item * 1024 / d) * 4.9e6 / 1e9,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="demo_out/store")
    ap.add_argument("--flow", default="demo_out/rfm-s2")
    ap.add_argument("--hybrid-out", default="demo_out/hybrid")
    ap.add_argument("--refit", action="store_true")
    ap.add_argument("--val-where", default="id LIKE '%7'")
    ap.add_argument("--max-val", type=int, default=3000)
    ap.add_argument(
        "--demo-limit", type=int, default=30000, help="restrict test to the demo's subsample (0: all)"
    )
    ap.add_argument("--max-test", type=int, default=0)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--one-draw-steps", type=int, default=250, help="Euler steps of the paper-protocol draw")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lik-steps", type=int, default=16)
    ap.add_argument("--calib-items", type=int, default=500)
    ap.add_argument("--calib-n", type=int, default=64)
    ap.add_argument("--index-rows", type=int, default=100_000)
    ap.add_argument("--parts", default="demo,synthetic,index")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = {
        "machine": cpu_info(),
    }
    parts = args.parts.split(",")
    for name, fn in (("demo", bench_demo), ("synthetic", bench_synthetic), ("index", bench_index)):
        if name in parts:
            t = time.perf_counter()
            res[name] = fn(args)
            res[name]["elapsed_s"] = time.perf_counter() - t
            print(json.dumps({name: res[name]}, default=float), file=sys.stderr)
    print(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
