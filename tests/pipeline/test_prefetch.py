"""Prefetcher: the one background producer (loader batches, import chunks) — order, bounds, stop, errors."""

from __future__ import annotations

import threading

import pytest

from geoloc.pipeline.prefetch import Prefetcher


def _threads(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == name and t.is_alive())


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_arrive_in_order(depth: int) -> None:
    assert list(Prefetcher(iter(range(50)), depth, name="t-order")) == list(range(50))


def test_producer_stays_at_most_depth_ahead() -> None:
    produced: list[int] = []
    gate = threading.Event()

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    with Prefetcher(items(), 2, name="t-bound") as it:
        assert next(it) == 0
        gate.wait(0.3)  # let the producer run as far as the queue allows
        # 1 taken + 2 queued + 1 held by the blocked put: never the whole source.
        assert len(produced) <= 4


def test_error_in_producer_reaches_consumer_after_good_items() -> None:
    def items():
        yield 1
        yield 2
        raise ValueError("boom at 3")

    it = Prefetcher(items(), 2, name="t-err")
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ValueError, match="boom at 3"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_close_stops_thread_and_closes_source() -> None:
    closed = threading.Event()

    def items():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = Prefetcher(items(), 2, name="t-close", join_s=5.0)
    assert next(it) == 0
    it.close()
    assert closed.wait(5.0)
    assert _threads("t-close") == 0
    with pytest.raises(StopIteration):
        next(it)


def test_dropping_the_iterator_stops_its_thread() -> None:
    it = Prefetcher(iter(range(10**9)), 1, name="t-drop", join_s=5.0)
    next(it)
    del it
    assert _threads("t-drop") == 0
