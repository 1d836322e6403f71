"""Work off the compute path: one background thread per job, in order, errors raised in the caller.

The rollout encodes and writes its samples on a :class:`Worker` while the model computes the next
batch; the update reads and decodes its next batch with :func:`prefetched` while the current one
trains. One thread each, so the order (and so the bytes written and the batches trained) is the
order of the single-threaded code. Torch's kernels, PNG's zlib and file I/O release the GIL, which is
what lets the two overlap.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


class Worker:
    """Runs submitted calls one after another on its own thread; at most ``depth`` wait.

    The first call that raises stops the worker: the calls after it are dropped and the error is
    raised by the next :meth:`submit` or by :meth:`finish`. Use it as a context manager: leaving
    the block by an exception drops what is still queued and joins the thread."""

    def __init__(self, depth: int, name: str) -> None:
        if depth < 1:
            raise ValueError(f"depth {depth} must be at least 1")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if self._error is None and not self._cancelled.is_set():
                fn, args = item
                try:
                    fn(*args)
                except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                    self._error = error

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` (blocks while ``depth`` calls wait); raises an earlier call's error."""
        self._raise()
        self._queue.put((fn, args))

    def finish(self) -> None:
        """Wait for every queued call; raise the first error among them."""
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()
        self._raise()

    def cancel(self) -> None:
        """Drop what is queued (the call running now completes) and join the thread."""
        self._cancelled.set()
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is None:
            self.finish()
        else:
            self.cancel()


def prefetched(items: Iterable[T], depth: int, name: str = "tempflow-prefetch") -> Iterator[T]:
    """``items``, drawn up to ``depth`` ahead on a background thread. An error while drawing is
    raised here at the point it happened; closing this iterator early stops the thread."""
    if depth < 1:
        raise ValueError(f"depth {depth} must be at least 1")
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put((_END, error))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()
