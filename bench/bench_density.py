"""How much does an adaptive H3 density map cost, and how accurate is it, against a uniform grid?

Two models, measured side by side in one run:
- a vMF geolocator with a known, sharp density (κ = 3·10⁴, σ ≈ 37 km; and κ = 50, σ ≈ 900 km): how many
  likelihood evaluations the adaptive map needs, and how far its total mass and peak density are from exact;
- an RFM network of the ``small`` preset's size (dim 256, depth 4, 384-d condition, random weights): the
  cost of one exact-likelihood evaluation (RK4, ``--steps``) on this CPU, which prices both the adaptive map
  (its evaluations) and a uniform grid at the same finest resolution (its cell count).

Then, on an RFM network with a sharper (larger-weight) random field, the map's total mass against the
likelihood solver and its steps (``mass_vs_steps``: the map is recomputed with doubled steps when it is more
than 1% off, so this says what that costs), and the render time per item of the PNG and HTML maps
(``geoloc.maps``) with the HTML file's size.

Prints one JSON object (medians over ``--repeats``), with the CPU model and whether bf16 is native.
``--quick`` uses fewer repeats and points.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_density.py
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from geoloc.config import FamilyConfig, LikelihoodConfig, ModelConfig
from geoloc.density import DensityConfig, density_map
from geoloc.devices import cpu_info
from geoloc.geolocator import Geolocator
from geoloc.maps import map_title, render_html, render_png
from geoloc.sphere import latlon_to_xyz, sample_uniform


def vmf(centre: tuple[float, float], kappa: float) -> Geolocator:
    geo = Geolocator.build(FamilyConfig(name="vmf"), ModelConfig(dim=16, depth=1, expansion=2), cond_dim=4)
    with torch.no_grad():
        geo.net.mu_head[-1].weight.zero_()
        geo.net.mu_head[-1].bias.copy_(latlon_to_xyz(torch.tensor(centre)))
        geo.net.kappa_head[-1].weight.zero_()
        geo.net.kappa_head[-1].bias.fill_(kappa)
    return geo


def rfm_small() -> Geolocator:
    torch.manual_seed(0)
    geo = Geolocator.build(
        FamilyConfig(name="rfm-s2"), ModelConfig(dim=256, depth=4, expansion=4), cond_dim=384
    )
    for m in geo.net.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
            torch.nn.init.normal_(m.weight, std=0.02)
    return geo


def rfm_sharp() -> Geolocator:
    """A random RFM field with larger weights: a peakier density, nearer a trained model's than rfm_small."""
    torch.manual_seed(0)
    geo = Geolocator.build(FamilyConfig(name="rfm-s2"), ModelConfig(dim=64, depth=2, expansion=2), cond_dim=8)
    for m in geo.net.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
            torch.nn.init.normal_(m.weight, std=0.6)
            torch.nn.init.normal_(m.bias, std=0.6)
    return geo


def h3_cells(res: int) -> int:
    return 2 + 120 * 7**res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=16, help="RK4 steps of the likelihood ODE")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    points = 128 if args.quick else 512
    lik = LikelihoodConfig(method="rk4", steps=args.steps)
    out: dict = {
        "machine": cpu_info(),
        "likelihood": f"rk4 x {args.steps}",
    }

    # Cost of one exact-likelihood evaluation for a small-preset RFM network.
    rfm = rfm_small()
    cond = torch.randn(384)
    xyz = sample_uniform(points, torch.Generator().manual_seed(0))
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        rfm.log_prob(xyz, cond, lik)
        rates.append(points / (time.perf_counter() - t))
    rate = statistics.median(rates)
    out["rfm_small_evals_per_s"] = round(rate, 1)

    # Adaptive maps of known densities: evaluations and accuracy.
    for name, kappa, start, levels in [
        ("sharp", 3e4, 1, 5),
        ("sharp_start0", 3e4, 0, 6),
        ("broad", 50.0, 1, 5),
    ]:
        geo = vmf((48.85, 2.35), kappa)
        walls, m = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            m = density_map(
                geo,
                torch.zeros(4),
                DensityConfig(start_resolution=start, levels=levels),
                generator=torch.Generator().manual_seed(0),
            )
            walls.append(time.perf_counter() - t)
        finest = int(m.resolution.max())
        peak = m.peaks(1)[0]
        out[name] = {
            "kappa": kappa,
            "start_resolution": start,
            "finest_resolution": finest,
            "evaluations": m.evaluations,
            "cells": len(m),
            "total_mass_error": round(abs(m.total_mass - 1.0), 5),
            "peak_log_density_error": round(abs(peak["log_density"] - math.log(kappa / (2 * math.pi))), 4),
            "wall_s_vmf": round(statistics.median(walls), 3),
            "uniform_grid_cells": h3_cells(finest),
            "rfm_small_adaptive_s": round(m.evaluations / rate, 1),
            "rfm_small_uniform_grid_h": round(h3_cells(finest) / rate / 3600, 1),
            "speedup": round(h3_cells(finest) / m.evaluations),
        }

    # The whole adaptive map on the RFM network itself (a smooth density: few refinements).
    t = time.perf_counter()
    m = density_map(
        rfm, cond, DensityConfig(levels=2, likelihood=lik), generator=torch.Generator().manual_seed(0)
    )
    out["rfm_small_map"] = {
        "evaluations": m.evaluations,
        "wall_s": round(time.perf_counter() - t, 1),
        "total_mass_error": round(abs(m.total_mass - 1.0), 5),
    }

    # Mass against solver and steps on a peakier field (escalation off, to see each setting alone).
    sharp, scond = rfm_sharp(), torch.randn(8, generator=torch.Generator().manual_seed(3))
    grid = [("rk4", 4), ("rk4", 8), ("midpoint", 8), ("midpoint", 16), ("midpoint", 32)]
    if not args.quick:
        grid += [("rk4", 16), ("euler", 16), ("euler", 32)]
    out["mass_vs_steps"] = {}
    for method, steps in grid:
        cfg = DensityConfig(
            levels=3, mass_tolerance=1.0, likelihood=LikelihoodConfig(method=method, steps=steps)
        )
        t = time.perf_counter()
        m = density_map(sharp, scond, cfg, generator=torch.Generator().manual_seed(0))
        out["mass_vs_steps"][f"{method}x{steps}"] = {
            "mass": round(m.total_mass, 4),
            "wall_s": round(time.perf_counter() - t, 1),
        }
    cfg = DensityConfig(levels=3, likelihood=LikelihoodConfig(method="midpoint", steps=4))
    m = density_map(sharp, scond, cfg, generator=torch.Generator().manual_seed(0))
    out["escalated_midpoint_from_4"] = {
        "mass": round(m.total_mass, 4),
        "steps": m.likelihood_steps,
        "evaluations": m.evaluations,
    }

    # Render time per item (the map of a three-mode vMF mixture: a sharp, a medium and a broad mode).
    geo = vmf((48.85, 2.35), 2e4)
    m = density_map(geo, torch.zeros(4), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        render_png(m, Path(tmp) / "warm.png", title="warm-up")  # imports, basemap and gazetteer caches
        png_s, html_s = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            render_png(
                m,
                Path(tmp) / "m.png",
                title=map_title("bench", "Paris", 1.0),
                truth=(48.9, 2.4),
                estimate=(48.8, 2.3),
            )
            png_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            page = render_html(
                m, Path(tmp) / "m.html", title="bench", truth=(48.9, 2.4), estimate=(48.8, 2.3)
            )
            html_s.append(time.perf_counter() - t)
        out["render"] = {
            "cells": len(m),
            "png_s_per_item": round(statistics.median(png_s), 2),
            "png_kb": round((Path(tmp) / "m.png").stat().st_size / 1024),
            "html_s_per_item": round(statistics.median(html_s), 2),
            "html_kb": round(page.stat().st_size / 1024),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
