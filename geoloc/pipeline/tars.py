"""Webdataset tar shards → samples: the one home for grouping tar members by key and catching truncation.

A webdataset sample is a run of consecutive tar members sharing a key (the member path up to the first dot
of its basename: ``dir/0001.jpg`` and ``dir/0001.json`` are sample ``dir/0001``). Both the image reader
(:mod:`geoloc.pipeline.readers`) and the embedding importer (:mod:`geoloc.pipeline.source_wds`) read them.

``tarfile`` treats an uncompressed tar cut inside a member header as a normal end of archive; a shard cut
there would pass silently. :func:`iter_tar_samples` therefore checks that the archive ends with a zero block
where the last member ends, and raises :class:`TarSampleError` (a ``tarfile.ReadError``) for that as for any
other read error, carrying the sample that was being read when it happened.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TarSample", "TarSampleError", "iter_tar_samples", "tar_ends_cleanly"]


@dataclass
class TarSample:
    """One sample: its key, every member's ``TarInfo`` by extension, and the bytes of the members asked for.

    ``data`` holds the members whose extension was in ``read``: they are read while the tar is walked, so
    reading them never seeks backwards (which would restart decompression of a ``.tar.gz``). Other members
    can be read from ``tar`` with ``tar.extractfile(infos[ext])``.
    """

    key: str
    infos: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    data: dict[str, bytes] = field(default_factory=dict)
    tar: tarfile.TarFile | None = None


class TarSampleError(tarfile.ReadError):
    """A tar shard became unreadable: ``partial`` is the sample being read then (None between samples),
    ``last`` the last member read, ``samples`` how many whole samples came before; ``__cause__`` the error."""

    def __init__(self, cause: BaseException, partial: TarSample | None, last: str, samples: int) -> None:
        super().__init__(str(cause))
        self.partial, self.last, self.samples = partial, last, samples
        self.kind = type(cause).__name__


def tar_ends_cleanly(path: str | Path, offset: int) -> bool:
    """Whether an uncompressed tar has a zero block at ``offset`` (where its last member ends).

    Compressed tars need no check: their decompressor raises on a truncated stream.
    """
    with open(path, "rb") as f:
        if f.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7"):
            return True
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and not block.strip(b"\0")


def iter_tar_samples(
    path: str | Path, read: Collection[str] = (), *, lower: bool = False
) -> Iterator[TarSample]:
    """The samples of one tar shard, in order; hidden members and members without an extension are skipped.

    ``read``: extensions whose bytes are read into ``TarSample.data``. ``lower``: extensions lower-cased.
    Raises :class:`TarSampleError` when the shard is unreadable, truncated included.
    """
    current: TarSample | None = None
    last, samples = "(start)", 0
    try:
        with tarfile.open(path, "r:*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                d, base = posixpath.split(info.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                if lower:
                    ext = ext.lower()
                key = posixpath.join(d, stem) if d else stem
                if current is None or key != current.key:
                    if current is not None:
                        samples += 1
                        yield current
                    current = TarSample(key, tar=tf)
                current.infos[ext] = info
                if ext in read:
                    f = tf.extractfile(info)
                    current.data[ext] = f.read() if f is not None else b""
                last = info.name
            end = tf.offset
            if not tar_ends_cleanly(path, end):
                raise tarfile.ReadError("file ends inside a member header (truncated tar)")
            if current is not None:
                done, current = current, None
                yield done
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if isinstance(e, TarSampleError):
            raise
        raise TarSampleError(e, current, last, samples) from e
