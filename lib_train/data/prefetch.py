"""Work on the next items of a sequence in a background thread while the current one is used (issue 13).

:class:`Prefetcher` walks an iterator in order and runs ``load(item)`` for up to ``depth`` items ahead in one worker
thread; the consumer gets ``(item, loaded)`` in the iterator's order, so what is trained is exactly what it would be
without it (a resumed run starts the iterator where it stopped, and the worker starts there too). The trainer uses it
for uncached latents: the worker decodes, resizes, crops and flips the next micro-batches' images (PIL releases the
GIL while it decodes and resamples) while the device runs the current step. An exception in ``load`` is raised to the
consumer at that item's turn; :meth:`Prefetcher.close` (also on leaving a ``with`` block) stops the worker and waits
for it, however the loop ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


class Prefetcher(Generic[T, R]):
    """``(item, load(item))`` for every item of ``items``, in order, computed up to ``depth`` items ahead by one
    background thread (``depth`` ≥ 1)."""

    def __init__(self, items: Iterable[T], load: Callable[[T], R], depth: int = 2, name: str = "lib_train-prefetch"):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._items, self._load = iter(items), load
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _put(self, entry: tuple) -> bool:
        """Put ``entry`` unless stopped meanwhile; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set():
                    return
                try:
                    entry = (item, self._load(item), None)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer at this item's turn
                    self._put((item, None, e))
                    return
                if not self._put(entry):
                    return
        except BaseException as e:  # noqa: BLE001 - the iterator itself failed
            self._put((None, None, e))
            return
        self._put((_END, None, None))

    def __iter__(self) -> Iterator[tuple[T, R]]:
        while True:
            item, loaded, error = self._queue.get()
            if error is not None:
                self.close()
                raise error
            if item is _END:
                self.close()
                return
            yield item, loaded

    def close(self) -> None:
        """Stop the worker (it finishes the item it is loading) and wait for it."""
        self._stop.set()
        while True:  # make room, so a worker blocked on a full queue sees the stop
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Prefetcher[T, R]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
