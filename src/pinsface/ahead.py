"""Work on the next items of a stream in background threads while the caller handles this one."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor


def ahead(items, work, depth: int = 1):
    """``(item, work(item))`` for each of ``items``, in order, with ``work`` already running on up to ``depth``
    following items (in as many threads) while the caller handles this one. Errors surface where their item is
    reached. ``items`` is read at most ``depth + 1`` items ahead of the caller."""
    with ThreadPoolExecutor(depth, thread_name_prefix="pinsface-ahead") as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(work, item)))
            if len(pending) > depth:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()
