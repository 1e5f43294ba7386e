"""geoloc: generative visual geolocation.

Given an image embedding, geoloc predicts a probability distribution over the sphere with diffusion,
flow matching or Riemannian flow matching ("Around the World in 80 Timesteps", CVPR 2025), and turns it
into points, top-k places, density maps and a localizability score.

Public names are imported lazily so that ``import geoloc`` (and ``geoloc --help``) stays fast.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Idle OpenMP threads sleep instead of spinning, unless the user chose (OMP_WAIT_POLICY set) or opted out
# (GEOLOC_OMP_PASSIVE=0). Why: torch's CPU kernels synchronise their threads many times per training step;
# with spinning waiters, a thread descheduled because another program wants a core stalls every barrier, and a
# small-preset step went from 0.12 s to 1-4 s on a 2-core CPU shared with one other job
# (bench/bench_threads.py measures it). Must run before torch is imported, hence here, in the package's first
# import.
if os.environ.get("GEOLOC_OMP_PASSIVE", "1") != "0":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_LAZY = {
    "Geolocator": "geoloc.geolocator",
    "Prediction": "geoloc.geolocator",
    "FAMILIES": "geoloc.families",
    "GeolocError": "geoloc.errors",
}

__all__ = ["FAMILIES", "GeolocError", "Geolocator", "Prediction", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoloc' has no attribute {name!r}")
