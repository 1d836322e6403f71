"""The background threads of the rollout's writer and the update's prefetch (stages.support.threads):
order kept, errors raised in the caller's thread, nothing left running."""

from __future__ import annotations

import threading
import time

import pytest

from stages.support.threads import Worker, prefetched


def _threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_worker_runs_calls_in_submission_order():
    done: list[int] = []
    with Worker(depth=2, name="test-worker") as worker:
        for i in range(50):
            worker.submit(done.append, i)
    assert done == list(range(50))
    assert not _threads_named("test-worker")


def test_worker_error_is_raised_by_the_next_submit_and_later_calls_are_dropped():
    done: list[int] = []

    def fail() -> None:
        raise ValueError("boom")

    worker = Worker(depth=1, name="test-worker")
    worker.submit(fail)
    time.sleep(0.05)  # the worker has run it
    with pytest.raises(ValueError, match="boom"):
        worker.submit(done.append, 1)
    with pytest.raises(ValueError, match="boom"):
        worker.finish()
    assert done == []


def test_worker_error_is_raised_by_finish():
    worker = Worker(depth=4, name="test-worker")
    worker.submit(lambda: None)
    worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.finish()


def test_leaving_the_block_by_an_exception_drops_the_queue_and_joins():
    done: list[int] = []
    gate = threading.Event()
    with pytest.raises(KeyError):
        with Worker(depth=8, name="test-worker") as worker:
            worker.submit(gate.wait)
            for i in range(5):
                worker.submit(done.append, i)
            threading.Timer(0.2, gate.set).start()  # the running call ends after the cancel
            raise KeyError("caller failed")
    assert not _threads_named("test-worker")
    assert done == []


def test_prefetched_yields_the_same_items_and_draws_ahead():
    drawn: list[int] = []

    def items():
        for i in range(10):
            drawn.append(i)
            yield i

    it = prefetched(items(), depth=2, name="test-prefetch")
    assert next(it) == 0
    time.sleep(0.05)
    assert len(drawn) >= 3  # one handed out, two waiting (and one being put)
    assert [0, *it] == list(range(10))
    assert not _threads_named("test-prefetch")


def test_prefetched_raises_the_producers_error_where_it_happened():
    def items():
        yield 1
        yield 2
        raise RuntimeError("damaged shard")

    got = []
    with pytest.raises(RuntimeError, match="damaged shard"):
        for item in prefetched(items(), depth=4):
            got.append(item)
    assert got == [1, 2]


def test_closing_prefetched_early_stops_its_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    it = prefetched(endless(), depth=2, name="test-prefetch")
    assert next(it) == 0
    it.close()
    assert not _threads_named("test-prefetch")


@pytest.mark.parametrize("depth", [0, -1])
def test_depth_must_be_positive(depth):
    with pytest.raises(ValueError, match="at least 1"):
        Worker(depth, "x")
    with pytest.raises(ValueError, match="at least 1"):
        next(prefetched([1], depth))
