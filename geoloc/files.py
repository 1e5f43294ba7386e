"""Durable file writes and content hashes: the one home for atomic writes, directory fsync and sha256.

Why one module: every writer in geoloc (checkpoints, store shards and manifests, gazetteer caches, reports,
maps) must leave either the old file or the new one after a crash, never a torn one, and every checksum must
be computed the same way so that a store written by one command verifies in another. Core code and the
pipeline both import from here; this module imports nothing from geoloc.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "sha256_file",
    "sha256_files",
]

_BLOCK = 1 << 22


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, then fsync + rename.

    The temporary name is hidden (``.name.XXXX.tmp``) and unique per call, so concurrent writers never share
    one; it is removed if ``write`` raises. The final file gets the user's normal permissions (mkstemp makes
    0600). Returns the final path.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, _write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """One sha256 over the contents of ``paths`` in sorted order (a weights folder's identity)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(_BLOCK), b""):
                h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of one file, read in 4 MiB blocks."""
    return sha256_files([path])
