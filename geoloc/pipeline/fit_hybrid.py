"""Fit a hybrid checkpoint: index the training features, then choose λ, κ, τ, k on a validation split.

A hybrid checkpoint is a flow checkpoint plus ``hybrid.json`` and the neighbour index files
(:mod:`geoloc.pipeline.neighbours`) in the same folder (or another folder whose ``hybrid.json`` points at the
flow). ``hybrid.json`` records the parameters, the database (store path, split, shard checksums, index
files), the validation split it was fitted on and the fit's numbers, plus the weighted-retrieval baseline's
own k and τ, chosen on the same items by GeoScore.

Fitting needs items the flow did not train on: a held-out split, or a slice of ``train`` carved with
``val_where`` (e.g. ``id LIKE '%7'``) that the flow's training excluded with the opposite filter. Each
validation item is in the index itself, so its own row is excluded from its neighbours. The flow's exact
log-density at each truth is computed once; the mixture's parameters are then fitted by L-BFGS on that cached
array (:func:`geoloc.hybrid.fit_hybrid_params`).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoloc.calibration import LevelMap, calibration_error, fit_level_map, hdr_levels
from geoloc.checkpoint import read_config
from geoloc.config import LikelihoodConfig
from geoloc.errors import CheckpointError, ConfigError, GeolocError
from geoloc.files import atomic_write_text
from geoloc.gazetteer import Gazetteer
from geoloc.geolocator import Geolocator
from geoloc.hybrid import (
    ANSWER_LEVELS,
    HybridGeolocator,
    HybridParams,
    Labeller,
    Neighbours,
    fit_answer_flow,
    fit_hybrid_params,
)
from geoloc.pipeline.eval_batches import iter_eval_batches
from geoloc.pipeline.neighbours import NeighbourIndex, store_identity
from geoloc.pipeline.store import MANIFEST
from geoloc.retrieval import fit_weighted_retrieval
from geoloc.sphere import latlon_to_xyz
from geoloc.subsample import id_hashes

__all__ = ["HYBRID_FILE", "FitHybridConfig", "ValidationItems", "fit_hybrid", "load_hybrid", "read_items"]

HYBRID_FILE = "hybrid.json"


@dataclass(frozen=True)
class FitHybridConfig:
    """How to fit.

    ``index_split``: the database. ``val_split`` / ``val_where``: the validation items, a uniform sample by id
    hash (:func:`read_items`). The density is fitted by likelihood on ``max_val`` of them (each costs a
    likelihood ODE); the answer on ``answer_items`` (flow draws only, so it can afford more: the settings it
    compares differ by a few GeoScore points). ``ks``: neighbour counts tried; ``logistic``: λ depends on the
    top-1 similarity (else one λ); ``likelihood``: the flow's likelihood ODE, also recorded for
    ``load_hybrid``. Each answer item gets ``answer_n`` flow draws of ``answer_steps`` steps, which choose the
    flow's share in the answer or its vote on the neighbours and, with ``answer_labels``, the weight of
    administrative-label agreement in it (:func:`geoloc.hybrid.fit_answer_flow`; the gazetteer labels the
    points). ``calibration_items`` validation items (0: skip), each with ``calibration_n`` exact draws, give
    the HDR levels of their truths under the fitted hybrid, from which its regions are recalibrated (a
    :class:`~geoloc.calibration.LevelMap`)."""

    index_split: str = "train"
    index_kind: str = "auto"
    answer_labels: bool = True
    calibration_items: int = 300
    calibration_n: int = 32
    val_split: str = "val"
    val_where: str | None = None
    max_val: int = 3000
    ks: tuple[int, ...] = (4, 8, 16, 32, 64)
    logistic: bool = True
    likelihood: LikelihoodConfig = field(default_factory=lambda: LikelihoodConfig(steps=16))
    answer_items: int = 500
    answer_n: int = 32
    answer_steps: int = 16
    batch_size: int = 1024
    device: str = "cpu"


@dataclass
class ValidationItems:
    """Items read from a store split: ids, conditions ``(V, D)``, true unit vectors ``(V, 3)``, degrees."""

    ids: list[str]
    cond: torch.Tensor
    xyz: torch.Tensor
    latlon: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)


READ_ROWS = 4096
"""Rows per batch when reading items."""


def read_items(
    stores: Sequence[str | Path],
    split: str,
    where: str | None = None,
    max_items: int | None = None,
    label_columns: Sequence[str] = (),
) -> ValidationItems:
    """The rows of ``split`` (filtered by ``where``): all of them in store order, or with ``max_items`` a
    deterministic uniform sample of that many — the rows whose ids hash lowest (:mod:`geoloc.subsample`),
    in hash order.

    Why not the first rows: a store keeps the order its manifest was written in, and tables are often sorted
    (the demo's GeoNames table is sorted by country code, so its first 1,000 validation names were countries
    A–G only). A fit, a calibration or a showcase on such a slice describes those countries, not the split.
    One pass with memory for ``max_items`` rows (a running bottom-k by hash).
    """
    parts: list[dict[str, Any]] = []
    held = n = 0
    for batch in iter_eval_batches(list(stores), split, READ_ROWS, where, label_columns):
        part = {
            "ids": np.asarray(batch.ids, dtype=object),
            "cond": batch.cond,
            "latlon": np.asarray(batch.latlon),
            **{f"label:{c}": np.asarray(batch.labels[c]) for c in label_columns},
        }
        if max_items is not None:
            part["hash"] = id_hashes(part["ids"])
        parts.append(part)
        n += len(part["ids"])
        held += len(part["ids"])
        if max_items is not None and held > 2 * max_items + READ_ROWS:  # keep memory O(max_items)
            parts = [_lowest(_merge(parts), max_items)]
            held = max_items
    if n == 0:
        raise ConfigError(
            f"no rows in split {split!r}{f' where {where}' if where else ''} of {list(map(str, stores))}"
        )
    keep = _merge(parts)
    if max_items is not None:
        keep = _lowest(keep, max_items)
        keep = _take(keep, np.argsort(keep["hash"], kind="stable"))
    ll = keep["latlon"]
    return ValidationItems(
        list(keep["ids"]),
        keep["cond"],
        latlon_to_xyz(torch.from_numpy(ll)).float(),
        ll,
        {c: keep[f"label:{c}"] for c in label_columns},
    )


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        k: torch.cat([p[k] for p in parts]) if torch.is_tensor(v) else np.concatenate([p[k] for p in parts])
        for k, v in parts[0].items()
    }


def _take(cols: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    return {k: v[torch.from_numpy(rows)] if torch.is_tensor(v) else v[rows] for k, v in cols.items()}


def _lowest(cols: dict[str, Any], k: int) -> dict[str, Any]:
    """The ``k`` rows with the lowest id hash (all rows when there are at most ``k``)."""
    if len(cols["ids"]) <= k:
        return cols
    return _take(cols, np.argpartition(cols["hash"], k - 1)[:k])


def flow_log_prob_at(
    geo: Geolocator, cond: torch.Tensor, xyz: torch.Tensor, config: LikelihoodConfig, batch_size: int = 1024
) -> torch.Tensor:
    """The flow's exact log-density at each item's own point ``(V,)``, in batches."""
    out = []
    for lo in range(0, len(cond), batch_size):
        out.append(geo.log_prob(xyz[lo : lo + batch_size], cond[lo : lo + batch_size], config).cpu())
    return torch.cat(out)


def fit_hybrid(
    flow_dir: str | Path,
    stores: Sequence[str | Path],
    out_dir: str | Path | None = None,
    config: FitHybridConfig = FitHybridConfig(),
    *,
    index: NeighbourIndex | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the index, fit the hybrid on the validation items, write ``out_dir`` (default: the
    flow's folder) and return the content of ``hybrid.json``."""
    say = log or (lambda _m: None)
    flow_dir = Path(flow_dir)
    out = Path(out_dir) if out_dir is not None else flow_dir
    geo = Geolocator.from_pretrained(flow_dir, device=config.device)
    t0 = time.perf_counter()
    if index is None:
        index = NeighbourIndex.build(stores, config.index_split, kind=config.index_kind, progress=progress)
    say(f"index: {len(index):,} rows ({index.meta.get('factory')}) in {time.perf_counter() - t0:.1f} s")
    val = read_items(stores, config.val_split, config.val_where, max(config.max_val, config.answer_items))
    exclude = torch.from_numpy(index.rows_of(val.ids))
    kmax = max(config.ks)
    nb_all = index.search(val.cond, kmax, exclude=exclude)
    d = min(config.max_val, len(val.ids))  # hash order: the first d items are a uniform sample too
    nb = nb_all.rows(slice(0, d))
    t1 = time.perf_counter()
    flow_lp = flow_log_prob_at(
        geo, val.cond[:d].to(geo.device), val.xyz[:d].to(geo.device), config.likelihood, config.batch_size
    )
    say(f"flow log-density of {d:,} validation truths in {time.perf_counter() - t1:.1f} s")
    fit = fit_hybrid_params(flow_lp, val.xyz[:d], nb, config.ks, logistic=config.logistic)
    retrieval = fit_weighted_retrieval(nb_all.xyz, nb_all.sim, val.xyz.to(nb_all.xyz.dtype))
    # The answer weighs the neighbours as the GeoScore-fitted retrieval row does (see HybridParams).
    fit.params = replace(fit.params, answer_k=int(retrieval["k"]), answer_tau=float(retrieval["tau"]))
    answer = None
    if config.answer_items > 0:
        t2 = time.perf_counter()
        m = min(config.answer_items, len(val.ids))
        labeller = gazetteer_labeller() if config.answer_labels else None
        model = HybridGeolocator(
            geo, index, fit.params, likelihood_config=config.likelihood, labeller=labeller
        )
        cond = val.cond[:m].to(geo.device)
        g = torch.Generator(device=geo.device).manual_seed(0)
        draws = torch.cat(
            [
                geo.sample(
                    cond[lo : lo + 256], config.answer_n, omega=0.0, steps=config.answer_steps, generator=g
                )
                for lo in range(0, m, 256)
            ]
        )
        sub = nb_all.rows(slice(0, m)).head(fit.params.search_k)
        answer = fit_answer_flow(model, cond, val.xyz[:m], sub, draws)
        fit.params = replace(
            fit.params,
            answer_flow=answer["answer_flow"],
            answer_poe=answer["answer_poe"],
            answer_labels=answer["answer_labels"],
            answer_draws=config.answer_n,
            answer_steps=config.answer_steps,
        )
        answer |= {"items": m, "draws": config.answer_n, "steps": config.answer_steps}
        say(
            f"answer: flow share x{answer['answer_flow']:g}, flow vote {answer['answer_poe']:g}, "
            f"label weight {answer['answer_labels']:g} (GeoScore {answer['geoscore']:.0f} on {m} "
            f"validation items, weakest column {answer['min_z']:+.1f} SE vs retrieval) "
            f"in {time.perf_counter() - t2:.1f} s"
        )
    calibration = None
    if config.calibration_items > 0:
        model = HybridGeolocator(geo, index, fit.params, likelihood_config=config.likelihood)
        calibration = _fit_level_map(model, val, nb_all, config, say)
    say(
        f"hybrid: {fit.params} NLL {fit.nll:.3f} nats (flow alone {fit.flow_nll:.3f}); "
        f"retrieval k={retrieval['k']} tau={retrieval['tau']} GeoScore {retrieval['geoscore']:.0f}"
    )
    files = index.save(out)
    flow_ref = "." if out.resolve() == flow_dir.resolve() else str(flow_dir.resolve())
    doc = {
        "format": "geoloc-hybrid",
        "version": 1,
        "flow": flow_ref,
        "params": fit.params.to_json(),
        "likelihood": asdict(config.likelihood),
        "index": {"files": {k: p.name for k, p in files.items()}, **{k: v for k, v in index.meta.items()}},
        "database": [store_identity(s, config.index_split) for s in stores],
        "fitted_on": {
            "split": config.val_split,
            "where": config.val_where,
            "items": d,
            "flow_trained_where": (read_config(flow_dir).get("data") or {}).get("where", ""),
        },
        "fit": {**fit.to_json(), "seconds": time.perf_counter() - t0},
        "retrieval": {k: v for k, v in retrieval.items() if k != "grid"} | {"grid": retrieval["grid"]},
        "answer": answer,
        "calibration": calibration,
    }
    atomic_write_text(out / HYBRID_FILE, json.dumps(doc, indent=2) + "\n")
    say(f"wrote {out / HYBRID_FILE}")
    return doc


def _fit_level_map(
    model: HybridGeolocator,
    val: ValidationItems,
    nb: Neighbours,
    config: FitHybridConfig,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """HDR levels of the first ``config.calibration_items`` validation truths under the fitted hybrid (from
    ``calibration_n`` exact draws each, own rows excluded from the neighbours ``nb``) → the level map that
    recalibrates its regions, as recorded in ``hybrid.json``."""
    t0 = time.perf_counter()
    m = min(config.calibration_items, len(val.ids))
    cond = val.cond[:m].to(model.device)
    sub = nb.rows(slice(0, m)).head(model.params.search_k)
    g = torch.Generator(device=model.device).manual_seed(1)
    _, lp = model.sample_with_log_prob(cond, config.calibration_n, g, neighbours=sub)
    truth_lp = model.log_prob_points(val.xyz[:m].unsqueeze(1).to(model.device), cond, sub)[:, 0]
    levels = hdr_levels(lp, truth_lp)
    level_map = fit_level_map(levels)
    raw_error = calibration_error(levels)
    say(
        f"calibration: raw error {raw_error:.3f} on {m} validation items; "
        "the 50/90% regions are the raw "
        f"{level_map.nominal_for(0.5):.2f}/{level_map.nominal_for(0.9):.2f} HDRs "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return {
        "items": m,
        "draws": config.calibration_n,
        "raw_error": raw_error,
        "level_map": level_map.to_json(),
    }


def load_hybrid(directory: str | Path, device: str = "cpu", *, verify_store: bool = True) -> HybridGeolocator:
    """Load a hybrid checkpoint: ``hybrid.json`` + its neighbour index + the flow it names.

    The index must be the one ``hybrid.json`` records (rows, dimension, database checksum) and take the
    flow's features; the store it was built from must still be where it was, unchanged (same shards), so
    the neighbours are the database the hybrid claims. Each failure is one line naming the file and what
    to do. ``verify_store=False`` trusts the index alone (e.g. a hybrid copied without its store: the index
    files hold everything prediction needs).
    """
    d = Path(directory)
    path = d / HYBRID_FILE
    if not path.exists():
        raise CheckpointError(f"{d}: no {HYBRID_FILE}; fit one with geoloc.pipeline.fit_hybrid.fit_hybrid")
    try:
        doc = json.loads(path.read_text())
        params = HybridParams.from_json(doc["params"])
        lik = LikelihoodConfig(**doc.get("likelihood", {}))
        files = dict(doc["index"]["files"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: missing or bad field ({e})") from e
    ref = doc.get("flow", ".")
    flow_dir = d if ref == "." else (Path(ref) if Path(ref).is_absolute() else d / ref)
    if not (flow_dir / "config.json").is_file():
        raise CheckpointError(
            f"{path}: the flow checkpoint it names ({flow_dir}) has no config.json; restore that folder "
            f"or edit 'flow' in {HYBRID_FILE} to point at it"
        )
    for role in ("index", "xyz"):
        f = d / files.get(role, "")
        if role not in files or not f.is_file():
            raise CheckpointError(
                f"{f}: the hybrid's neighbour {role} file is missing; copy the neighbours.* files beside "
                f"{HYBRID_FILE}, or refit with geoloc.pipeline.fit_hybrid.fit_hybrid"
            )
    geo = Geolocator.from_pretrained(flow_dir, device=device)
    index = NeighbourIndex.load(d)
    _check_index(doc, index, d, geo.cond_dim)
    _check_backbone(doc, geo, path)
    if verify_store:
        for rec in doc.get("database") or []:
            _check_store(rec, path)
    labeller = gazetteer_labeller() if params.answer_labels > 0 else None
    cal = doc.get("calibration") or {}
    try:
        level_map = LevelMap.from_json(cal["level_map"]) if cal.get("level_map") else None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad calibration.level_map ({e}); refit the hybrid") from e
    return HybridGeolocator(
        geo, index, params, likelihood_config=lik, info=doc, labeller=labeller, level_map=level_map
    )


@functools.cache
def gazetteer_labeller() -> Labeller:
    """The published labelling rule (:class:`~geoloc.gazetteer.Gazetteer`, its cached table) at the answer's
    levels, loaded once per process: the label-aware answer labels every candidate of every query."""
    return functools.partial(Gazetteer.load().label_ids, levels=ANSWER_LEVELS)


def _check_index(doc: dict[str, Any], index: NeighbourIndex, d: Path, cond_dim: int) -> None:
    """The loaded index is the one ``hybrid.json`` recorded, and takes the flow's features."""
    f = d / doc["index"]["files"]["index"]
    want_rows, want_dim = doc["index"].get("rows"), doc["index"].get("dim")
    if (want_rows is not None and len(index) != int(want_rows)) or (
        want_dim is not None and index.dim != int(want_dim)
    ):
        raise CheckpointError(
            f"{f}: holds {len(index):,} rows of {index.dim}-d features but {HYBRID_FILE} records "
            f"{want_rows:,} of {want_dim}-d; the index was replaced: refit with geoloc.pipeline.fit_hybrid"
        )
    want = [s.get("shards_sha256") for s in doc["index"].get("stores") or []]
    got = [s.get("shards_sha256") for s in index.meta.get("stores") or []]
    if want and got and want != got:
        raise CheckpointError(
            f"{d / 'neighbours.json'}: the index was built from other store shards than {HYBRID_FILE} "
            "records; refit with geoloc.pipeline.fit_hybrid"
        )
    if index.dim != cond_dim:
        raise CheckpointError(
            f"{f}: {index.dim}-d features, but the flow takes {cond_dim}-d; the index and the flow come "
            "from different backbones: refit with geoloc.pipeline.fit_hybrid"
        )


def _check_backbone(doc: dict[str, Any], geo: Geolocator, path: Path) -> None:
    """The database was embedded with the backbone the flow was trained on (when both record one)."""
    flow_bb = geo.backbone.get("name")
    for rec in doc.get("database") or []:
        db_bb = (rec.get("backbone") or {}).get("name")
        if flow_bb and db_bb and db_bb != flow_bb:
            raise CheckpointError(
                f"{path}: the store {rec.get('path')} holds {db_bb!r} features but the flow was trained on "
                f"{flow_bb!r}; refit against a store of {flow_bb!r} features (geoloc.pipeline.fit_hybrid)"
            )


def _check_store(rec: dict[str, Any], path: Path) -> None:
    """The store the hybrid retrieves from is where ``hybrid.json`` says, with the same shards."""
    store = Path(rec.get("path", ""))
    if not (store / MANIFEST).is_file():
        raise CheckpointError(
            f"{store}: the store this hybrid retrieves from ({path} 'database') is missing; restore it "
            "there, refit against the store you have (geoloc.pipeline.fit_hybrid), or load with "
            "verify_store=False to trust the index alone"
        )
    try:
        now = store_identity(store, rec.get("split", "train"))
    except (OSError, ValueError, GeolocError) as e:
        raise CheckpointError(f"{store}: cannot read the store this hybrid retrieves from ({e})") from e
    if now.get("shards_sha256") != rec.get("shards_sha256"):
        raise CheckpointError(
            f"{store}: changed since the hybrid was fitted ({rec.get('rows', '?'):,} → {now['rows']:,} "
            f"rows of split {rec.get('split')!r}, other shards); refit with geoloc.pipeline.fit_hybrid"
        )
