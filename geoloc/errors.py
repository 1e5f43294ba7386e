"""The few exception types geoloc raises on purpose.

Every error that a user can cause (bad config, bad manifest, bad store, bad checkpoint, missing weights)
is a :class:`GeolocError`. The CLI catches exactly these at one boundary and prints a one-line message;
anything else is a bug and keeps its traceback. Bad-input errors also subclass :class:`ValueError`, so
library callers can catch either.
"""

from __future__ import annotations

__all__ = [
    "BackboneError",
    "CheckpointError",
    "ConfigError",
    "GeolocError",
    "InputError",
    "ManifestError",
    "StoreError",
    "TrainingError",
]


class GeolocError(Exception):
    """Base class: a problem the user can fix; the message says what, where and what to do."""


class ConfigError(GeolocError, ValueError):
    """An invalid configuration value, preset name or override."""


class InputError(GeolocError, ValueError):
    """Invalid numeric input: NaN / out-of-range coordinates, wrong condition dimension, ..."""


class ManifestError(GeolocError, ValueError):
    """A dataset manifest that does not validate."""


class StoreError(GeolocError):
    """A feature store that is missing, corrupt, or incompatible with the request."""


class CheckpointError(GeolocError):
    """A checkpoint that is missing, corrupt, or incompatible with the data."""


class BackboneError(GeolocError):
    """An unknown backbone, or its weights are not where they should be."""


class TrainingError(GeolocError):
    """Training had to stop (non-finite loss, empty data); the last good checkpoint is kept."""
