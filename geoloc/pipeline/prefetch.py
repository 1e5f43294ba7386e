"""``Prefetcher``: the one background producer of the pipeline (loader batches, import chunks).

Reading the next item (a DuckDB batch, a Parquet/tar chunk) overlaps with processing the current one when a
thread produces items into a bounded queue. The rules both users need live here once:
- bounded: at most ``depth`` items wait, so memory stays bounded whatever the producer's speed;
- clean stop: ``close()`` — or dropping the iterator, or leaving a ``with`` block — stops the thread and
  closes the source iterator (so its files and DuckDB readers close) from the producer thread;
- error propagation: an exception in the producer reaches the consumer, raised from ``next()``.
``depth=0`` produces in the caller's thread (no thread at all), with the same interface.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")
_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _close(items: Iterator[Any]) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _put(q: queue.Queue, stop: threading.Event, item: object) -> bool:
    """Put ``item`` unless stopped first (polls so a stopped consumer never leaves the thread blocked)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(items: Iterator[Any], q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            if not _put(q, stop, item):
                return
        _put(q, stop, _END)
    except BaseException as e:  # handed to the consumer, which re-raises it
        _put(q, stop, _Raised(e))
    finally:
        _close(items)


def _shutdown(stop: threading.Event, q: queue.Queue, thread: threading.Thread, join_s: float) -> None:
    stop.set()
    with contextlib.suppress(queue.Empty):
        while True:
            q.get_nowait()
    if thread is not threading.current_thread():
        thread.join(timeout=join_s)


class Prefetcher(Generic[T]):
    """Iterate ``items`` with up to ``depth`` of them produced ahead on a daemon thread named ``name``."""

    def __init__(
        self, items: Iterator[T], depth: int, name: str = "geoloc-prefetch", join_s: float = 10.0
    ) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._done = False
        self._items: Iterator[T] | None = None
        self._q: queue.Queue | None = None
        self._finalizer: weakref.finalize | None = None
        if depth == 0:
            self._items = items
            return
        self._q = queue.Queue(maxsize=depth)
        stop = threading.Event()
        thread = threading.Thread(target=_produce, args=(items, self._q, stop), name=name, daemon=True)
        # The thread and the finaliser hold only the queue and the event, never self, so dropping the
        # iterator triggers the finaliser, which stops the thread.
        self._finalizer = weakref.finalize(self, _shutdown, stop, self._q, thread, join_s)
        thread.start()

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        if self._q is None:
            assert self._items is not None
            try:
                return next(self._items)
            except StopIteration:
                self._done = True
                raise
        item = self._q.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Raised):
            self.close()
            raise item.exc
        return item

    def close(self) -> None:
        """Stop producing (idempotent); the thread exits and the source iterator is closed."""
        self._done = True
        if self._finalizer is not None:
            self._finalizer()
        elif self._items is not None:
            _close(self._items)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
