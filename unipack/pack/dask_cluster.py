"""``merge --executor dask --scheduler ADDR``: the per-tensor jobs on a Dask distributed cluster.

Imported only when that executor is chosen (``dask[distributed]`` is the optional extra
``unipack[dask]``). A job is a top-level function of plain data (``dense.tensor_job``,
``lora.module_job``, ``dense.lossless_job``): Dask pickles a reference to the function and
its arguments; a worker imports unipack, opens the inputs by path (``executors.opened``: shared
storage, the same paths as here) or by URL (object storage, read through fsspec) and sends back
the tensor's record and compressed blobs.
The merging process takes results in plan order (``Executor.in_order``), so the bundle is the
one ``--jobs 1`` writes, byte for byte, provided the workers run the same versions of unipack,
numpy and zstd (checked on each worker's first job).

ADDR: a scheduler's address (``tcp://host:port``, ``host:port``, or another protocol Dask
speaks, e.g. ``tls://``) or the JSON file ``dask scheduler --scheduler-file`` writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable
from typing import Any

from unipack.errors import ClusterError, OptionsError, first_line
from unipack.pack.executors import Executor, Inputs, forget

#: Seconds to wait for the scheduler to answer, and for a worker to join it, before giving up.
CONNECT_TIMEOUT_S = 20.0
#: Jobs kept in flight per worker thread: each busy, with one result ready to be taken.
JOBS_PER_THREAD = 2


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise OptionsError(
            "--executor dask needs dask.distributed, which is not installed: pip install 'unipack[dask]'"
        ) from None
    return distributed


class DaskCluster(Executor):
    """Jobs over ``inputs`` on the Dask cluster whose scheduler ``scheduler`` names. Leaving the
    context early (an error, Ctrl-C) cancels every job still pending; a job already running on a
    worker finishes there (Dask cannot stop a running task) and its result is dropped. Leaving it
    in any way closes the inputs on every worker."""

    def __init__(self, scheduler: str, inputs: Inputs | None = None, timeout: float | None = None) -> None:
        distributed = _distributed()
        self.scheduler, self.inputs = scheduler, inputs
        wait = CONNECT_TIMEOUT_S if timeout is None else timeout
        where: dict[str, Any]
        if "://" not in scheduler and os.path.isfile(scheduler):
            where = {"scheduler_file": scheduler}
        elif "://" in scheduler or ":" in scheduler:
            where = {"address": scheduler}
        else:
            raise OptionsError(
                f"--scheduler {scheduler!r}: neither an address (tcp://host:port) nor a scheduler file; "
                f"give the address `dask scheduler` prints, or its --scheduler-file"
            )
        _quiet_logs(True)
        try:
            self.client = distributed.Client(**where, timeout=wait, set_as_default=False)
        except (OSError, TimeoutError, asyncio.TimeoutError, ValueError) as exc:
            _quiet_logs(False)
            raise ClusterError(
                f"--scheduler {scheduler}: no Dask scheduler answered within {wait:g} s "
                f"({first_line(exc, with_type=True)}); start one (`dask scheduler`) or check the address"
            ) from None
        self._futures: set[Any] = set()
        try:
            self.client.wait_for_workers(1, timeout=wait)
            threads = sum(self.client.nthreads().values())
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            self.client.close()
            _quiet_logs(False)
            raise ClusterError(
                f"--scheduler {scheduler}: the scheduler has no workers ({first_line(exc, with_type=True)}); "
                f"start some (`dask worker {scheduler}`)"
            ) from None
        self.window = JOBS_PER_THREAD * max(1, threads)

    def start(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        # pure=False: every merge's jobs are its own (two merges of the same inputs must not
        # share, or cancel, each other's tasks).
        future = self.client.submit(fn, *args, pure=False)
        self._futures.add(future)

        def wait() -> Any:
            try:
                return future.result()
            except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:  # the second: a BaseException
                raise self._failed(future, exc) from None
            except Exception as exc:
                if self.connected and "scheduler-connection-lost" not in str(exc) and not _from_dask(exc):
                    raise  # the job's own error, as the worker raised it
                raise self._failed(future, exc) from None
            finally:
                self._futures.discard(future)
                if self.connected:
                    future.release()  # the result is ours now: the cluster need not keep it

        return wait

    @property
    def connected(self) -> bool:
        """Whether the client still talks to the scheduler (it closes itself when reconnecting
        fails for ``CONNECT_TIMEOUT_S``)."""
        return str(getattr(self.client, "status", "")) == "running"

    def _failed(self, future: Any, exc: BaseException) -> ClusterError:
        """The error for a job the cluster did not finish: its scheduler went away (the client
        cancels every future, then gives up reconnecting after ``CONNECT_TIMEOUT_S``), or it lost
        the job (a worker died: ``KilledWorker``)."""
        if not self.connected or "scheduler-connection-lost" in str(exc):
            return ClusterError(
                f"--scheduler {self.scheduler}: the Dask scheduler went away during the merge "
                f"({first_line(exc, with_type=True)}); nothing was written: restart it and merge again"
            )
        return ClusterError(
            f"--scheduler {self.scheduler}: job {future.key} was lost on the Dask cluster "
            f"({first_line(exc, with_type=True)}); a worker died (out of memory?) or the scheduler went away"
        )

    def __exit__(self, *exc: object) -> None:
        try:
            if not self.connected:  # nothing to cancel or to tell: the scheduler is gone
                self._futures.clear()
                return
            if self._futures:  # left early: no pending job may keep the cluster busy
                self.client.cancel(list(self._futures), force=True)
                self._futures.clear()
            if self.inputs is not None:  # workers hold the inputs open for this merge's next job
                self.client.run(forget, self.inputs, on_error="ignore")
        finally:
            self.client.close(timeout=CONNECT_TIMEOUT_S)
            _quiet_logs(False)


#: The families of loggers the client side of Dask writes to stderr with (Dask's logging config
#: gives several of them handlers and levels of their own), and their levels before a merge.
_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")
_saved_levels: dict[str, int] = {}


def _quiet_logs(quiet: bool) -> None:
    """The client side of Dask logs its troubles (a lost scheduler, its reconnection attempts and
    their cancellation, with tracebacks) to stderr; the merge reports them itself, as one line
    (``ClusterError``). Quiet while a merge holds a client, restored after."""
    import logging

    if not quiet:
        for name, level in _saved_levels.items():
            logging.getLogger(name).setLevel(level)
        _saved_levels.clear()
        return
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] in _LOGGERS]
    for name in {*_LOGGERS, *names}:
        log = logging.getLogger(name)
        _saved_levels.setdefault(name, log.level)
        log.setLevel(logging.CRITICAL + 1)


def _from_dask(exc: BaseException) -> bool:
    """Whether ``exc`` is Dask's (a lost worker or scheduler), not one a job raised."""
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("distributed", "dask", "tornado")
