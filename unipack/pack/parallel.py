"""How many local worker processes a merge forks (``--jobs``), and how they treat signals.

A tensor's choice and encoding depend only on the members' values of that tensor and on the
options, so tensors can be fitted side by side: ``executors.ForkPool`` runs their jobs on
workers forked from the merging process (they inherit its open checkpoints), which send back
what the serial merge would have written for each tensor; the parent applies the results in the
plan's order, so the bundle is byte-identical whatever the number of jobs
(tests/test_parallel_merge.py).

Only sources read with ``pread`` are forked (safetensors files and folders of them): a torch
checkpoint reads through torch, whose thread pools are not safe to use in a forked child.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Sequence

from unipack.sources.checkpoint import Checkpoint

#: Below this many bytes of inputs a merge runs in-process: forking and shipping results back
#: costs more than a small merge gains (and the test suite's many tiny merges stay serial).
PARALLEL_FROM_BYTES = 64 * 1024 * 1024
#: The same for PEFT adapters, whose modules cost far more time per input byte (every level
#: count of the quantized-factor search): a few MiB of adapters already take seconds.
LORA_PARALLEL_FROM_BYTES = 4 * 1024 * 1024


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


def quiet_worker() -> None:
    """A forked worker's signals: Ctrl-C reaches the whole process group, but the parent handles
    it (and terminates the pool); a worker must neither print a traceback nor run the parent's
    clean-up handlers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
