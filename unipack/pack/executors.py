"""Where a merge's per-tensor jobs run: in this process, on forked workers, or on a Dask cluster.

A tensor's work is a job: a top-level function of plain data (``Inputs``: where the members
are; the ``MergeOptions``; the tensor's plan entry) returning what the merge writes for it (its
record, its blobs already compressed, each member's coefficients and numbers: ``StoredTensor``
in ``dense``). An executor runs jobs and hands their results back in the order they were given,
so the merging process appends them in plan order and the bundle is byte-identical whatever ran
them (tests/test_parallel_merge.py, tests/test_dask_executor.py). Three executors, one small
interface (``Executor``):

* ``Serial``: in this process. The merger then calls its own methods with the real bundle
  writer (nothing is recorded and replayed), as the merge always did with ``--jobs 1``.
* ``ForkPool``: ``--jobs N`` forked workers. They inherit the merging process's open inputs
  (registered here before the fork), so a job opens nothing.
* ``DaskCluster`` (``dask_cluster.py``, imported only when chosen): ``--executor dask
  --scheduler ADDR``. Its workers open the inputs themselves by path (shared storage) or URL
  (object storage), once per worker process and merge.

Each keeps at most ``window`` jobs in flight: results are taken in order, so a slow job at the
head would otherwise let every later result pile up in the merging process. Where the caller
bounds each job's result (``in_order``'s ``bounds``: a tensor's input bytes, which its stored
bytes never exceed), more jobs may start behind a slow head, while the results that could pile
up behind it stay under ``PILE_BYTES``: one large tensor's job (a real model's embedding) then
no longer leaves the other workers idle.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import sys
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from unipack.errors import ClusterError, InputError, OptionsError
from unipack.pack import parallel
from unipack.sources.checkpoint import Checkpoint, close_all, open_inputs
from unipack.sources.remote import file_stamp
from unipack.sources.url import InputPath, Url, as_input

#: ``--executor``: the choices.
EXECUTORS = ("local", "dask")


@dataclass(frozen=True)
class Inputs:
    """Where a merge's members are, as plain data a worker process opens by itself: absolute
    paths (workers of a cluster must see them at the same paths: shared storage) or URLs (read
    through fsspec: object storage the workers can reach, see ``sources.remote``), the members'
    names (reasons and errors name them), the sizes and latest modification times the merging
    process saw (a worker that sees other files refuses them; a file saved again is another
    input, never one a worker still holds open) and the versions that decide the bundle's bytes."""

    paths: tuple[str, ...]
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    modified: tuple[int, ...]
    environment: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, checkpoints: Sequence[Checkpoint]) -> Inputs:
        return cls(
            tuple(c.path.text if isinstance(c.path, Url) else os.path.abspath(c.path) for c in checkpoints),
            tuple(c.name for c in checkpoints),
            tuple(c.file_size for c in checkpoints),
            tuple(modified(c) for c in checkpoints),
            environment(),
        )


def modified(checkpoint: Checkpoint) -> int:
    """The latest modification time (ns) of the files a member is read from (for a URL: its
    version, see ``sources.remote.file_stamp``)."""
    return max((file_stamp(path) for path, _ in checkpoint.files), default=0)


def environment() -> tuple[tuple[str, str], ...]:
    """The versions a bundle's bytes depend on: unipack's arithmetic and choices, numpy's
    (LAPACK) results, zstd's compressed bytes and ZipNN's, where a lossless tier measures it
    (its installed version read from its metadata: importing it takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy as np
    import zstandard

    from unipack.version import __version__

    try:
        zipnn = version("zipnn")
    except PackageNotFoundError:
        zipnn = "absent"
    return (
        ("unipack", __version__),
        ("numpy", np.__version__),
        ("blas", numpy_blas()),
        ("zstd", ".".join(map(str, zstandard.ZSTD_VERSION))),
        ("zipnn", zipnn),
    )


@functools.lru_cache(maxsize=1)  # a process's BLAS does not change; threadpoolctl takes ~5-25 ms
def numpy_blas() -> str:
    """numpy's BLAS library, its version and the CPU kernels it runs. The same numpy wheel runs
    other kernels on another CPU family (OpenBLAS picks them at run time: Haswell, SkylakeX, ...),
    whose sums round differently: a worker on one would write other bytes than the merging
    process on the other."""
    import numpy as np
    from threadpoolctl import threadpool_info

    home = os.path.dirname(os.path.dirname(np.__file__))  # site-packages: numpy/ and numpy.libs/
    mine = [
        lib
        for lib in threadpool_info()
        if lib.get("user_api") == "blas" and str(lib.get("filepath", "")).startswith(os.path.join(home, "numpy"))
    ]
    if not mine:  # numpy linked to a BLAS outside its wheel (a distribution's, conda's): as built
        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        return f"{blas.get('name', 'unknown')} {blas.get('version', '')}".strip()
    return "; ".join(
        sorted(f"{lib.get('internal_api')} {lib.get('version')} {lib.get('architecture', '')}".strip() for lib in mine)
    )


# The inputs this process has open for jobs: the merging process registers its own before it
# forks (a fork inherits them); a Dask worker opens a merge's inputs on its first job of it and
# keeps them for the next, until the merge ends (``forget``) or, should the merging process not
# say so (killed), until KEEP_OPEN later merges have opened theirs. Merges that overlap on one
# worker (its threads, or several clients) each keep their own.
_OPENED: dict[Inputs, list[Checkpoint]] = {}
_OWNED: list[Inputs] = []  # opened here (and so closed here), least recently opened first
KEEP_OPEN = 8
_WORKER_READY = False
_LOCK = threading.RLock()


def opened(inputs: Inputs) -> list[Checkpoint]:
    """The members of ``inputs``, open in this process (a forked worker's were opened by its
    parent; a Dask worker opens them on its first job)."""
    with _LOCK:  # a Dask worker's threads may start two jobs of one merge at once
        found = _OPENED.get(inputs)
        return found if found is not None else _open(inputs)


def _open(inputs: Inputs) -> list[Checkpoint]:
    _prepare_worker()
    mine = environment()
    if mine != inputs.environment:
        merging, worker = dict(inputs.environment), dict(mine)
        differ = ", ".join(
            f"{k} {worker[k]} on the worker, {merging.get(k)} in the merging process"
            for k in worker
            if worker[k] != merging.get(k)
        )
        raise ClusterError(
            f"worker {_host()} runs other versions ({differ}); a bundle's bytes depend on them: install "
            f"the same versions on the workers"
        )
    try:
        checkpoints = open_inputs([as_input(p) for p in inputs.paths], list(inputs.names))
    except InputError as exc:
        raise InputError(f"{exc} (opened on worker {_host()}: workers read the inputs by path or URL)") from None
    for c, size, stamp in zip(checkpoints, inputs.sizes, inputs.modified):
        if (c.file_size, modified(c)) != (size, stamp):
            seen = f"{c.file_size:,} bytes {_when(c.path, modified(c))}"
            close_all(checkpoints)
            raise InputError(
                f"{c.path}: {seen} on worker {_host()}, {size:,} bytes {_when(c.path, stamp)} where the "
                f"merge started; workers must read the same files (shared storage, not changed during the merge)"
            )
    _OPENED[inputs] = checkpoints
    _OWNED.append(inputs)
    while len(_OWNED) > KEEP_OPEN:
        _forget(_OWNED[0])
    return checkpoints


def forget(inputs: Inputs) -> None:
    """Close ``inputs`` where this process opened them (run on every Dask worker as a merge ends)."""
    with _LOCK:
        _forget(inputs)


def _forget(inputs: Inputs) -> None:
    if inputs in _OWNED:
        _OWNED.remove(inputs)
        close_all(_OPENED.pop(inputs, []))


def _when(path: InputPath, ns: int) -> str:
    """``modified <time>`` of a local file's stamp; ``version <hex>`` of a URL's."""
    if isinstance(path, Url):
        return f"version {ns:014x}"
    import datetime

    return "modified " + datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).isoformat(
        timespec="microseconds"
    )


def _host() -> str:
    import socket

    return f"{socket.gethostname()}, pid {os.getpid()}"


#: glibc's ``mallopt`` parameters: the size of free memory at a heap's top from which ``free``
#: returns it to the system, and the size from which ``malloc`` maps memory of its own.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: What a Dask worker sets both to (see ``_prepare_worker``): above any one temporary array of a
#: typical tensor's job; the rare larger ones cost enough per element that a fresh mapping does
#: not matter.
WORKER_MALLOC_THRESHOLD = 64 << 20


def _prepare_worker() -> None:
    """Set once, for good, in a worker process that opens inputs itself (a Dask worker):

    * one BLAS thread, as ``merge`` sets around the merging process (LAPACK's results, and so
      the bundle's bytes, depend on the thread count); never restored, as jobs on a Dask
      worker's threads overlap;
    * glibc's trim and mmap thresholds at ``WORKER_MALLOC_THRESHOLD``. A Dask nanny starts its
      workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand memory back early), which also
      freezes the mmap threshold at 128 KiB: every temporary array of a tensor job was then
      mapped or trimmed away and page-faulted afresh. Measured on tools/bench_merge.py's
      population (101 tensor jobs in one task): 588k page faults and 6.4 s of CPU against 55k
      and 2.6 s in a plain process; with these thresholds 4k and 2.6 s. A worker then keeps up
      to that much freed memory for the next job instead of returning it."""
    global _WORKER_READY
    if _WORKER_READY:
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    if sys.platform.startswith("linux") and "MALLOC_TRIM_THRESHOLD_" in os.environ:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(M_TRIM_THRESHOLD, WORKER_MALLOC_THRESHOLD)
            libc.mallopt(M_MMAP_THRESHOLD, WORKER_MALLOC_THRESHOLD)
        except (OSError, AttributeError):  # not glibc: none of this applies
            pass
    _WORKER_READY = True


class Executor(ABC):
    """Runs jobs (a function and its arguments) and gives their results back in order."""

    #: True: jobs run in the merging process, which may call its own methods instead.
    in_process = False
    #: The most jobs ``in_order`` keeps started and not yet taken, whatever their bounds.
    window = 1

    @abstractmethod
    def start(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        """Start ``fn(*args)``; returns the function that waits for its result (and raises the
        job's exception, if it raised one)."""

    def in_order(
        self, fn: Callable[..., Any], argses: Iterable[tuple[Any, ...]], bounds: Sequence[int] | None = None
    ) -> Iterator[Any]:
        """``fn(*args)`` for each of ``argses``, yielded in that order, at most ``window`` in flight;
        with ``bounds`` (each job's result, in bytes, at most), more while the bounds of the jobs
        behind the oldest sum to at most ``PILE_BYTES`` and fewer than ``window * PILE_JOBS`` are
        in flight."""
        waiting: deque[tuple[Callable[[], Any], int]] = deque()
        behind = 0  # the bounds of the jobs after the oldest: what could pile up while it runs
        for index, args in enumerate(argses):
            bound = bounds[index] if bounds is not None else 0
            # Room first: the oldest is taken while the window is full and this job could push
            # what piles up behind it over the limit (or the jobs in flight over their cap).
            while len(waiting) >= self.window and (
                bounds is None or behind + bound > PILE_BYTES or len(waiting) >= self.window * PILE_JOBS
            ):
                yield self._take(waiting)
                behind -= waiting[0][1] if waiting else 0  # the next oldest is no longer behind
            if waiting:
                behind += bound
            waiting.append((self.start(fn, *args), bound))
        while waiting:
            yield self._take(waiting)

    @staticmethod
    def _take(waiting: deque[tuple[Callable[[], Any], int]]) -> Any:
        wait, _ = waiting.popleft()
        return wait()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:  # noqa: B027 (nothing to release unless a pool says so)
        pass


#: The most result bytes (by the callers' bounds) ``in_order`` lets pile up behind a slow job.
PILE_BYTES = 512 << 20
#: And the most jobs in flight, as a multiple of ``window`` (each is a task a pool or scheduler holds).
PILE_JOBS = 8


class Serial(Executor):
    """In this process, each job when its result is asked for."""

    in_process = True

    def start(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        return lambda: fn(*args)


def _call(task: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    fn, args = task
    return fn(*args)


#: How often a wait for a forked worker's result wakes to let a signal's handler run.
SIGNAL_POLL_SECONDS = 0.25


class ForkPool(Executor):
    """``jobs`` forked workers; they inherit ``checkpoints``, open here, as ``inputs``. Leaving
    the context early (an exception, Ctrl-C) terminates them."""

    def __init__(self, jobs: int, inputs: Inputs, checkpoints: list[Checkpoint]) -> None:
        self.inputs, self.window = inputs, 2 * jobs  # every worker busy, and one result ready each
        _OPENED[inputs] = checkpoints
        self._pool = multiprocessing.get_context("fork").Pool(jobs, initializer=parallel.quiet_worker)

    def start(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        pending = self._pool.apply_async(_call, ((fn, args),))

        def wait() -> Any:
            # Ctrl-C reaches this process through whichever thread the kernel picks; when that is
            # one of the pool's threads, an untimed wait here never wakes to run the handler and
            # the merge sits out the job (a test caught it hanging 1 run in 3 under load). Waking
            # every fraction of a second lets the handler raise here.
            while True:
                try:
                    return pending.get(timeout=SIGNAL_POLL_SECONDS)
                except multiprocessing.TimeoutError:
                    continue

        return wait

    def __exit__(self, *exc: object) -> None:
        self._pool.terminate()
        self._pool.join()
        _OPENED.pop(self.inputs, None)


@dataclass(frozen=True)
class Execution:
    """Where a merge's jobs run: ``executor`` ``local`` (``jobs`` processes; None: automatic, see
    ``parallel.effective_jobs``) or ``dask`` (the cluster whose scheduler ``scheduler`` names:
    ``tcp://host:port``, ``host:port`` or a scheduler file). Never recorded in the bundle."""

    executor: str = "local"
    jobs: int | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        jobs = self.jobs
        if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
            raise OptionsError(f"--jobs {jobs}: give a whole number of processes, at least 1")
        if self.executor not in EXECUTORS:
            raise OptionsError(f"--executor {self.executor!r}: expected one of {', '.join(EXECUTORS)}")
        if self.executor == "dask":
            if not self.scheduler:
                raise OptionsError(
                    "--executor dask needs --scheduler ADDR (tcp://host:port of a running `dask scheduler`, "
                    "or its --scheduler-file)"
                )
            if jobs is not None:
                raise OptionsError(
                    "--jobs is for --executor local; a Dask cluster runs as many jobs at once as its workers "
                    "have threads"
                )
        elif self.scheduler is not None:
            raise OptionsError("--scheduler is for --executor dask (the local executor starts its own workers)")

    def open(self, checkpoints: list[Checkpoint], n_jobs: int, from_bytes: int) -> Executor:
        """The executor for ``n_jobs`` jobs over ``checkpoints``; ``from_bytes``: the inputs'
        size from which an automatic ``--jobs`` forks (see ``parallel.effective_jobs``)."""
        if self.executor == "dask":
            from unipack.pack.dask_cluster import DaskCluster

            assert self.scheduler is not None
            return DaskCluster(self.scheduler, Inputs.of(checkpoints))
        workers = parallel.effective_jobs(self.jobs, checkpoints, n_jobs, from_bytes)
        if workers == 1:
            return Serial()
        return ForkPool(workers, Inputs.of(checkpoints), checkpoints)
