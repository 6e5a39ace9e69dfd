"""Ranks of one node in one process: as in a real job, the ranks of a node save side by
side (a step commits in a node's tiers once every rank of the node has written it there)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def side_by_side(work: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``work(item)`` for every item at once, one thread each: the results in order; the
    first error is raised once every thread is done."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        futures = [pool.submit(work, item) for item in items]
    return [future.result() for future in futures]
