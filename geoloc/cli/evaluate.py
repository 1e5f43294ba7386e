"""`geoloc eval`: the paper's metrics for checkpoints and baselines on a feature-store split.

Thin by design: options → :class:`~geoloc.config.EvalConfig` → :func:`~geoloc.pipeline.eval_job.run_eval` →
the Markdown table on the terminal. Every default and choice list is read from ``EvalConfig`` and the
choice types next to it in ``geoloc/config.py``, so a default changes in one place.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from geoloc.config import (
    BASELINES,
    COMPAT_MODES,
    ESTIMATOR_CHOICES,
    EVAL_CLI_DEVICE,
    EVAL_SPLIT,
    RETRIEVAL_INDEXES,
    TABLE_LAYOUTS,
    EvalConfig,
    LikelihoodConfig,
)
from geoloc.errors import ConfigError


def _choices(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    """A Typer choice type over ``values`` (Typer takes enums, not Literal types, for lists of choices)."""
    return StrEnum(name, {v: v for v in values})


EstimatorOpt = _choices("EstimatorOpt", ESTIMATOR_CHOICES)
BaselineOpt = _choices("BaselineOpt", BASELINES)
CompatOpt = _choices("CompatOpt", COMPAT_MODES)
IndexOpt = _choices("IndexOpt", RETRIEVAL_INDEXES)
TableOpt = _choices("TableOpt", TABLE_LAYOUTS)

_DEFAULT = EvalConfig()
_LIKELIHOOD = _DEFAULT.likelihood


def register(app: typer.Typer) -> None:
    """Add `geoloc eval`."""
    app.command("eval")(eval_command)


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from e
    return seeds


def _parse_estimators(single: str, listed: str | None) -> tuple[str, ...]:
    """``--estimators a,b`` in order without repeats, else ``--estimator`` alone."""
    names = [e.strip() for e in (listed or "").split(",") if e.strip()] or [single]
    unknown = [e for e in names if e not in ESTIMATOR_CHOICES]
    if unknown:
        raise ConfigError(f"--estimators: unknown {unknown}; choose from {', '.join(ESTIMATOR_CHOICES)}")
    return tuple(dict.fromkeys(names))


def _parse_labels(text: str) -> str | dict[str, str]:
    if "=" not in text:
        return text.strip()
    out: dict[str, str] = {}
    for pair in text.split(","):
        level, sep, column = pair.partition("=")
        if not sep or not level.strip() or not column.strip():
            raise ConfigError(f"--labels {text!r}: expected LEVEL=COLUMN pairs, e.g. country=cc,city=town")
        out[level.strip()] = column.strip()
    return out


def eval_command(
    store: Annotated[
        list[Path],
        typer.Option(
            "--store",
            help="Feature store directory; repeat to read several (same backbone).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output folder (report.json, table.md, predictions, plots).", show_default=False
        ),
    ],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = EVAL_SPLIT,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option("--checkpoint", help="Checkpoint directory; repeat for one table row each."),
    ] = None,
    baseline: Annotated[
        list[BaselineOpt] | None,
        typer.Option(
            "--baseline",
            help="uniform, retrieval (nearest training embedding), or retrieval-weighted (k neighbours "
            "weighted by similarity, the max-expected-GeoScore neighbour); repeatable.",
        ),
    ] = None,
    estimator: Annotated[
        EstimatorOpt, typer.Option(help="Point estimate: sample = one guided draw (the paper's protocol).")
    ] = EstimatorOpt(_DEFAULT.estimator),
    estimators: Annotated[
        str | None,
        typer.Option(
            help="Several estimators in one run, comma-separated (e.g. sample,geoscore): "
            "one row each per checkpoint."
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", help="Draws per item for the other estimators.", min=1)
    ] = _DEFAULT.n,
    omega: Annotated[
        float | None,
        typer.Option(help="Guidance ω (default: 2 for sample, 0 otherwise).", show_default=False),
    ] = None,
    steps: Annotated[int, typer.Option(help="Sampler steps.", min=1)] = _DEFAULT.steps,
    method: Annotated[str, typer.Option(help="Sampler: euler, heun, midpoint, rk4, ddim.")] = _DEFAULT.method,
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds; metrics are mean ± std over them.")
    ] = ",".join(str(s) for s in _DEFAULT.seeds),
    batch_size: Annotated[int, typer.Option(help="Items per batch.", min=1)] = _DEFAULT.batch_size,
    where: Annotated[str | None, typer.Option(help="SQL filter on the split's rows.")] = _DEFAULT.where,
    drop_tail: Annotated[
        int,
        typer.Option(
            help="Score only whole batches of this size (PLONK's quirk E); 0 scores every item.", min=0
        ),
    ] = _DEFAULT.drop_tail,
    compat: Annotated[
        CompatOpt,
        typer.Option(
            help="fixed: every item counts, failures are misses; plonk: the published code's quirks."
        ),
    ] = CompatOpt(_DEFAULT.compat),
    labels: Annotated[
        str,
        typer.Option(
            help="Admin ground truth: auto (OSV-5M unique_* columns), none, latlon, "
            "or LEVEL=COLUMN pairs (country,region,sub-region,city)."
        ),
    ] = str(_DEFAULT.labels),
    nll: Annotated[
        bool, typer.Option("--nll/--no-nll", help="Exact NLL of the true location (Table 2).")
    ] = _DEFAULT.nll,
    nll_method: Annotated[
        str,
        typer.Option(
            help="Likelihood ODE solver: rk4, heun, midpoint, euler, dopri5 (the paper, with --nll-tol 1e-6)."
        ),
    ] = _LIKELIHOOD.method,
    nll_steps: Annotated[
        int, typer.Option(help="Steps of a fixed-step likelihood solver.", min=1)
    ] = _LIKELIHOOD.steps,
    nll_tol: Annotated[float | None, typer.Option(help="rtol = atol of dopri5.", show_default=False)] = None,
    localizability: Annotated[
        bool,
        typer.Option(
            "--localizability", help="Per-item localizability (costly: --loc-samples exact draws each)."
        ),
    ] = _DEFAULT.localizability,
    loc_samples: Annotated[
        int, typer.Option(help="Draws per item for the localizability.", min=1)
    ] = _DEFAULT.localizability_n,
    prdc: Annotated[
        bool, typer.Option("--prdc/--no-prdc", help="Precision/recall/density/coverage.")
    ] = _DEFAULT.prdc,
    calibration: Annotated[
        bool,
        typer.Option(
            "--calibration/--no-calibration",
            help="Coverage of the 50/90/95% highest-density regions and calibration error per row "
            "(costly: --calibration-samples exact draws and log-densities per item).",
        ),
    ] = _DEFAULT.calibration,
    calibration_samples: Annotated[
        int, typer.Option(help="Exact draws per item for the calibration.", min=2)
    ] = _DEFAULT.calibration_n,
    calibration_items: Annotated[
        int,
        typer.Option(
            help="Calibrate on about N items, a uniform sample by id hash (0: every item); the draws cost "
            "per item.",
            min=0,
        ),
    ] = _DEFAULT.calibration_items,
    retrieval_k: Annotated[
        int | None,
        typer.Option(
            help="Neighbours of the retrieval-weighted row (default: a hybrid checkpoint's fit, else "
            "chosen leave-one-out on the retrieval split).",
            min=1,
            show_default=False,
        ),
    ] = _DEFAULT.retrieval_k,
    retrieval_tau: Annotated[
        float | None,
        typer.Option(help="Similarity temperature of the retrieval-weighted row.", show_default=False),
    ] = _DEFAULT.retrieval_tau,
    retrieval_split: Annotated[str, typer.Option(help="Split the retrieval baseline searches.")] = (
        _DEFAULT.retrieval_split
    ),
    retrieval_index: Annotated[
        IndexOpt, typer.Option(help="flat (exact) or hnsw (approximate, big stores).")
    ] = IndexOpt(_DEFAULT.retrieval_index),
    table: Annotated[
        TableOpt,
        typer.Option(
            help="Table 1 layout: auto (osv5m with admin labels, else yfcc4k), osv5m, yfcc4k, full."
        ),
    ] = TableOpt(_DEFAULT.table),
    csv: Annotated[bool, typer.Option("--csv", help="Also write predictions.csv.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the PNG plots.")] = True,
    gazetteer_cache: Annotated[
        Path | None,
        typer.Option(help="Folder of the cached label table (default: ~/.cache/geoloc).", show_default=False),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = EVAL_CLI_DEVICE,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Evaluate checkpoints and baselines on a store split: the paper's Tables 1 and 2, plus per-item files.

    Every item of the split is scored (a failed prediction counts as a miss and is reported); each model
    predicts once per seed and the table shows mean ± std. Writes report.json, table.md,
    predictions.parquet (and .csv), error_cdf.png and, with --localizability, localizability.png.

    Example:
        geoloc eval --store features/osv5m --checkpoint runs/rfm --baseline uniform --out eval/osv5m
        geoloc eval --store features/yfcc --split test --checkpoint runs/a --checkpoint runs/b --baseline retrieval --seeds 0 --out eval/yfcc
        geoloc eval --store features/osv5m --checkpoint runs/rfm --compat plonk --nll-method dopri5 --nll-tol 1e-6 --out eval/plonk
        geoloc eval --store demo_out/store --split test --checkpoint demo_out/hybrid --estimators sample,geoscore --baseline retrieval --baseline retrieval-weighted --calibration --out eval/hybrid
    """  # noqa: E501 (typer prints this docstring as the help: its example lines stay whole)
    # The job (torch, faiss, duckdb) is imported when the command runs, so that `geoloc --help` stays fast.
    from geoloc.pipeline.eval_job import run_eval

    tol = {} if nll_tol is None else {"rtol": nll_tol, "atol": nll_tol}
    chosen = _parse_estimators(estimator.value, estimators)
    if (retrieval_k is None) != (retrieval_tau is None):
        raise ConfigError("give --retrieval-k and --retrieval-tau together (or neither: they are fitted)")
    config = EvalConfig(
        estimator=chosen[0],
        estimators=chosen if len(chosen) > 1 else (),
        calibration=calibration,
        calibration_n=calibration_samples,
        calibration_items=calibration_items,
        retrieval_k=retrieval_k,
        retrieval_tau=retrieval_tau,
        n=samples,
        omega=omega,
        steps=steps,
        method=method,
        seeds=_parse_seeds(seeds),
        batch_size=batch_size,
        where=where,
        drop_tail=drop_tail,
        compat=compat.value,
        labels=_parse_labels(labels),
        nll=nll,
        likelihood=LikelihoodConfig(method=nll_method, steps=nll_steps, **tol),
        localizability=localizability,
        localizability_n=loc_samples,
        prdc=prdc,
        retrieval_split=retrieval_split,
        retrieval_index=retrieval_index.value,
        device=device,
        table=table.value,
        gazetteer_cache=str(gazetteer_cache) if gazetteer_cache else None,
    )
    report = run_eval(
        store,
        split,
        checkpoints=checkpoint or [],
        baselines=[b.value for b in baseline or []],
        config=config,
        out_dir=out,
        csv=csv,
        plots=plots,
        progress=progress,
        log=lambda m: typer.echo(m, err=True),
    )
    typer.echo(report.table_markdown())
    failed = {r.name: int(sum(r.metrics.get("n_failed", []))) for r in report.rows}
    if any(failed.values()):
        fate = "dropped (compat plonk)" if compat == "plonk" else "scored as misses"
        typer.echo(
            f"failed predictions ({fate}): " + ", ".join(f"{k} {v:,}" for k, v in failed.items() if v),
            err=True,
        )
    typer.echo(
        f"evaluated {report.n:,} items × {len(report.rows)} row(s) in {report.elapsed_s:.1f} s → {out}",
        err=True,
    )
