"""Per-tensor jobs on a local process pool, their results applied in the plan's order.

A tensor's choice and encoding depend only on the members' values of that tensor and on the
options, so tensors can be fitted side by side. Workers are forked from the merging process
(they inherit its open checkpoints, options and plans: only a tensor's index goes to a worker)
and send back what the serial merge would have written for that tensor: its record, its blobs
already compressed, each member's coefficients, codes, raw references, errors and fidelity, and
the calls it made on the alternatives meter. The parent applies them in the plan's order, so
the bundle is byte-identical whatever the number of jobs (tests/test_parallel_merge.py).

Only sources read with ``pread`` are forked (safetensors files and folders of them): a torch
checkpoint reads through torch, whose thread pools are not safe to use in a forked child.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from unipack.sources.checkpoint import Checkpoint

#: Below this many bytes of inputs a merge runs in-process: forking and shipping results back
#: costs more than a small merge gains (and the test suite's many tiny merges stay serial).
PARALLEL_FROM_BYTES = 64 * 1024 * 1024
#: The same for PEFT adapters, whose modules cost far more time per input byte (every level
#: count of the quantized-factor search): a few MiB of adapters already take seconds.
LORA_PARALLEL_FROM_BYTES = 4 * 1024 * 1024

# The functions a forked worker runs, set in the parent just before the pool forks (a closure
# over the merger cannot be pickled; a fork inherits this module's globals instead).
_TASKS: dict[str, Callable[[int], object]] = {}


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def effective_jobs(
    jobs: int | None, checkpoints: Sequence[Checkpoint], n_tensors: int, from_bytes: int = PARALLEL_FROM_BYTES
) -> int:
    """How many worker processes a merge uses: ``jobs`` (None: automatic), 1 where forking is
    unsafe (a source read through torch) or not worth it (inputs under ``from_bytes``, one tensor)."""
    if jobs is not None and jobs < 1:
        raise ValueError("jobs must be at least 1")
    if jobs == 1 or n_tensors < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if not all(c.fork_safe for c in checkpoints):
        return 1
    if jobs is None:
        if sum(c.file_size for c in checkpoints) < from_bytes:
            return 1
        jobs = min(default_jobs(), jobs_that_fit(checkpoints))
    return max(1, min(jobs, n_tensors))


#: A tensor's working set in a merge, per element of one member's copy: its float64 sums, mean,
#: one member's delta and the candidates' codes (measured: the 20M-parameter bench_merge model's
#: largest tensor raised the peak by ~78 bytes per element; rounded up).
WORKING_BYTES_PER_ELEMENT = 96


def jobs_that_fit(checkpoints: Sequence[Checkpoint]) -> int:
    """How many workers the free memory holds, each fitting the largest tensor at once (every
    core of a large machine on a large model would otherwise multiply the merge's peak)."""
    largest = max((info.numel for c in checkpoints for info in c.tensors.values()), default=0)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not reported here: do not limit
        return default_jobs()
    return max(1, free // max(1, largest * WORKING_BYTES_PER_ELEMENT))


def _quiet_worker() -> None:
    # Ctrl-C reaches the whole process group: the parent handles it (and terminates the pool);
    # a worker must neither print a traceback nor run the parent's clean-up handlers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _run(task: tuple[str, int]) -> object:
    name, index = task
    return _TASKS[name](index)


class Workers:
    """A pool of ``jobs`` forked workers running the named ``tasks`` (functions of an index);
    with ``jobs == 1`` everything runs in this process, in the same order. Use as a context
    manager: leaving it early (an exception, Ctrl-C) terminates the workers."""

    def __init__(self, jobs: int, tasks: dict[str, Callable[[int], object]]) -> None:
        self.tasks = tasks
        self._pool: Any = None
        if jobs > 1:
            _TASKS.clear()
            _TASKS.update(tasks)
            self._pool = multiprocessing.get_context("fork").Pool(jobs, initializer=_quiet_worker)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            _TASKS.clear()

    def start(self, name: str, index: int = 0) -> Callable[[], Any]:
        """Run one task in the background; returns the function that waits for its result."""
        if self._pool is None:
            return lambda: self.tasks[name](index)
        pending = self._pool.apply_async(_run, ((name, index),))
        return lambda: pending.get()

    def in_order(self, name: str, count: int) -> Iterator[Any]:
        """``tasks[name](0) ... (count - 1)``, yielded in index order; any exception in a task
        is raised here."""
        if self._pool is None:
            for index in range(count):
                yield self.tasks[name](index)
            return
        yield from self._pool.imap(_run, [(name, index) for index in range(count)], chunksize=1)
