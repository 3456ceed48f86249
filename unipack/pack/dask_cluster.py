"""``merge --executor dask --scheduler ADDR``: the per-tensor jobs on a Dask distributed cluster.

Imported only when that executor is chosen (``dask[distributed]`` is the optional extra
``unipack[dask]``). A job is a top-level function of plain data (``dense.tensor_job``,
``lora.module_job``, ``dense.lossless_job``): Dask pickles a reference to the function and
its arguments; a worker imports unipack, opens the inputs by path (``executors.opened``: shared
storage, the same paths as here) and sends back the tensor's record and compressed blobs.
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
        try:
            self.client = distributed.Client(**where, timeout=wait, set_as_default=False)
        except (OSError, TimeoutError, asyncio.TimeoutError, ValueError) as exc:
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
            except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
                raise ClusterError(self._lost(future, exc)) from None
            except Exception as exc:
                if _from_dask(exc):  # a worker died (KilledWorker), the scheduler went away
                    raise ClusterError(self._lost(future, exc)) from None
                raise  # the job's own error, as the worker raised it
            finally:
                self._futures.discard(future)
                future.release()  # the result is ours now: the cluster need not keep it

        return wait

    def _lost(self, future: Any, exc: BaseException) -> str:
        return (
            f"--scheduler {self.scheduler}: job {future.key} was lost on the Dask cluster "
            f"({first_line(exc, with_type=True)}); a worker died (out of memory?) or the scheduler went away"
        )

    def __exit__(self, *exc: object) -> None:
        try:
            if self._futures:  # left early: no pending job may keep the cluster busy
                self.client.cancel(list(self._futures), force=True)
                self._futures.clear()
            if self.inputs is not None:  # workers hold the inputs open for this merge's next job
                self.client.run(forget, self.inputs, on_error="ignore")
        finally:
            self.client.close(timeout=CONNECT_TIMEOUT_S)


def _from_dask(exc: BaseException) -> bool:
    """Whether ``exc`` is Dask's (a lost worker or scheduler), not one a job raised."""
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("distributed", "dask", "tornado")
