"""Deterministic uniform subsamples of items, chosen by a stable hash of their ids.

Why: stores keep the order their manifest was written in, and tables are often sorted (the demo's GeoNames
table is sorted by country code). "The first N items" of such a store is a slice of a few countries, so a
fit, a calibration or a showcase on it describes those countries, not the split. A hash of the id picks the
same items on every machine, whatever the store order, shard layout or batch size.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["HASH_RANGE", "id_hashes", "in_hash_sample"]

HASH_RANGE = 2**32
"""Hashes are uniform on [0, 2^32)."""


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """A stable 32-bit hash of each id (CRC-32 of its UTF-8 bytes), as uint32."""
    return np.fromiter((zlib.crc32(str(i).encode()) for i in ids), dtype=np.uint32, count=len(ids))


def in_hash_sample(ids: Sequence[str], fraction: float) -> np.ndarray:
    """Mask of the ids in a uniform sample of about ``fraction`` of all ids (hash below fraction · 2^32):
    the same ids whatever batches they arrive in, so a streaming pass can select them one batch at a time."""
    return id_hashes(ids).astype(np.float64) < float(fraction) * HASH_RANGE
