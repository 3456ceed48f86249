"""Work over a member's tensors on a few threads, handed back in the manifest's order.

Rebuilding a tensor is reading, zstd decoding, sha256 and numpy passes over large arrays, all
of which release the GIL, so threads overlap them on a multi-core machine. The caller sees the
results in order, with at most ``threads`` of them computed ahead of the one it holds (memory
stays a few tensors, whatever the member's size), and the first failure in that order raises,
as it would on one thread.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from unipack.format import codec

Item = TypeVar("Item")
Result = TypeVar("Result")


def in_order(
    work: Callable[[Item], list[Result]], items: Sequence[Item], threads: int, name: str = "unipack"
) -> Iterator[Result]:
    """Every result of ``work(item)`` for each item, in the items' order; on ``threads`` threads
    (each decoding through a zstd scratch buffer it keeps), or in the caller's thread for 1 (then
    a chunked blob's frames are decoded one after the other too: one thread means one) or for a
    single item (whose chunked blobs still decode on the chunk pool)."""
    if threads <= 1 or len(items) < 2:
        with codec.scratch_buffer(), codec.one_thread() if threads <= 1 else contextlib.nullcontext():
            for item in items:
                yield from work(item)
        return
    pending: deque[Future[list[Result]]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=codec.keep_scratch_buffer) as pool:
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) > threads:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:  # an error, or a caller that stopped early: start nothing more
            for future in pending:
                future.cancel()
