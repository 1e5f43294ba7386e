"""geoloc: generative visual geolocation.

Given an image embedding, geoloc predicts a probability distribution over the sphere with diffusion,
flow matching or Riemannian flow matching ("Around the World in 80 Timesteps", CVPR 2025), and turns it
into points, top-k places, density maps and a localizability score.

Public names are imported lazily so that ``import geoloc`` (and ``geoloc --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

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
