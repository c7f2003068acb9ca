"""Prepare the next batches in background threads while the model computes (``--workers N``).

The default is in-process (``workers=0``); why, and when threads help: docs/performance.md.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

_END = object()


def prefetch(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], workers: int, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the same batches in the same order, produced ``workers * 2`` ahead by a thread."""
    if workers <= 0:
        yield from batches
        return
    q: queue.Queue = queue.Queue(maxsize=max(2, 2 * workers))
    stop = threading.Event()

    def produce() -> None:
        try:
            for x, y in batches:
                if pin_memory:
                    x, y = x.pin_memory(), y.pin_memory()
                while not stop.is_set():
                    try:
                        q.put((x, y), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=produce, name="rifle-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
