"""``merge --executor dask --scheduler ADDR``: per-tensor jobs on a Dask cluster (a 2-worker
``LocalCluster``, one per module) give the serial merge's bundle byte for byte (dense rules,
the lossless baseline, LoRA adapters; through the API and the CLI, by address and by scheduler
file), an error raised in a worker is the error the local pool gives, and every way of asking
wrongly (no dask, no scheduler, an unreachable one, --scheduler without dask, --jobs with it,
inputs that differ on a worker, Ctrl-C) ends in one clean line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    TensorSpec,
    assert_members_within,
    assert_one_line_error,
    listing,
    run,
    standard_specs,
    write_population,
)
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

import unipack
from unipack.errors import ClusterError, InputError, OptionsError
from unipack.pack import executors
from unipack.pack.executors import Executor, Inputs

distributed = pytest.importorskip("distributed")

SPECS = {
    **standard_specs(),
    "head.weight": TensorSpec((3, 12), kind="head"),  # shapes differ: raw per member
    "blocks.0.weight": TensorSpec((64, 96), kind="right", rank=3, scale=0.05),
    "blocks.1.weight": TensorSpec((96, 64), kind="noise", scale=0.02),
}


def on(scheduler: str | Path) -> list[str]:
    """The flags that send a merge's jobs to the Dask cluster of ``scheduler``."""
    return ["--executor", "dask", "--scheduler", str(scheduler)]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        yield local


@pytest.fixture(scope="module")
def pop(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return write_population(tmp_path_factory.mktemp("dask") / "in", SPECS, n=5, seed=21)


@pytest.mark.parametrize(
    "options",
    [
        {},  # the default rule: deltas, subspaces, raw heads, exact buffers, the alternatives meter
        {"max_delta_error": 0.2, "lossless": "full"},  # another bound; the zstd -19 baseline on workers
        {"rank": 2, "dtype": "float16", "baselines": False},
        {"exact_tier": True},  # the lossless tier's residuals, made on the workers
    ],
)
def test_a_dask_cluster_writes_the_serial_bundle_byte_for_byte(cluster, pop, tmp_path: Path, options: dict) -> None:
    serial, remote = tmp_path / "serial.upk", tmp_path / "dask.upk"
    unipack.merge(pop.paths, serial, jobs=1, **options)
    result = unipack.merge(pop.paths, remote, executor="dask", scheduler=cluster.scheduler_address, **options)
    assert digest(serial) == digest(remote)
    assert result.file_bytes == remote.stat().st_size
    # an independent look at what the cluster's bundle gives back: every member within its bound
    bound = 0.05 if "rank" not in options else None
    assert_members_within(remote, pop, bound)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dask.upk", "serial.upk"]  # no spool left


def test_the_cli_by_address_and_by_scheduler_file(cluster, pop, tmp_path: Path) -> None:
    assert run("merge", *pop.paths, "-o", tmp_path / "serial.upk", "--jobs", "1", "-q").exit_code == 0
    r = run("merge", *pop.paths, "-o", tmp_path / "a.upk", "-q", *on(cluster.scheduler_address))
    assert r.exit_code == 0, r.output
    # the JSON file `dask scheduler --scheduler-file` writes (its "address" is what a client reads)
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"type": "Scheduler", "address": cluster.scheduler_address}))
    r = run("merge", *pop.paths, "-o", tmp_path / "b.upk", "-q", *on(scheduler_file))
    assert r.exit_code == 0, r.output
    assert digest(tmp_path / "a.upk") == digest(tmp_path / "b.upk") == digest(tmp_path / "serial.upk")
    # the merges are over: no worker still holds their inputs open
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        assert set(client.run(lambda: len(__import__("unipack.pack.executors").pack.executors._OPENED)).values()) == {0}


def test_lora_adapters_on_a_dask_cluster(cluster, tmp_path: Path) -> None:
    from test_lora_bundle import factor_update, rel, structured_population

    adapters = structured_population(tmp_path / "p", n=4, noise=0.3, seed=5, ranks=[8, 4])
    paths = [a.path for a in adapters]
    for options in ({"max_error": 0.1, "lossless": "full"}, {"max_error": 0.3, "dtype": "float16"}):
        serial, remote = tmp_path / "serial.upk", tmp_path / "dask.upk"
        unipack.merge(paths, serial, jobs=1, force=True, **options)
        unipack.merge(paths, remote, executor="dask", scheduler=cluster.scheduler_address, force=True, **options)
        assert serial.read_bytes() == remote.read_bytes()
        # independently: every adapter's update s B A, rebuilt from the bundle, within the bound
        with unipack.open(remote) as b:
            for a in adapters:
                loaded = b.load(a.name)
                for module, (_, _, scale) in a.modules.items():
                    error = rel(a.update(module), factor_update(loaded, module, scale))
                    assert error <= options["max_error"] + 1e-9, (a.name, module)


def test_an_error_in_a_worker_is_the_local_pools_error(cluster, tmp_path: Path) -> None:
    """A tensor past the arithmetic's range is refused where it is decomposed: in a worker."""
    pop = write_population(tmp_path / "in", SPECS, n=3, seed=3)
    tensors = load_numpy(str(pop.paths[1]))
    tensors["blocks.1.weight"] = tensors["blocks.1.weight"] * np.float32(2.0**41)
    save_numpy(tensors, str(pop.paths[1]))
    messages = []
    for where in ({"jobs": 1}, {"jobs": 2}, {"executor": "dask", "scheduler": cluster.scheduler_address}):
        out = tmp_path / "out" / "b.upk"
        with pytest.raises(InputError) as caught:
            unipack.merge(pop.paths, out, **where)  # type: ignore[arg-type]
        messages.append(str(caught.value))
        assert listing(out.parent) == []
    assert "blocks.1.weight" in messages[0] and "--raw" in messages[0]
    assert messages[0] == messages[1] == messages[2]
    r = run("merge", *pop.paths, "-o", tmp_path / "c.upk", *on(cluster.scheduler_address))
    assert assert_one_line_error(r) == f"Error: {messages[0]}"


def test_a_worker_refuses_other_files_or_other_versions(pop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers open the inputs by path: what they see must be what the merge planned on."""
    monkeypatch.setattr(executors, "_WORKER_READY", True)  # this process is no worker: leave its BLAS be
    from unipack.sources.checkpoint import close_all, open_inputs

    checkpoints = open_inputs(pop.paths, None)
    try:
        inputs = Inputs.of(checkpoints)
    finally:
        close_all(checkpoints)
    assert inputs.paths == tuple(os.path.abspath(p) for p in pop.paths)
    assert inputs.sizes == tuple(p.stat().st_size for p in pop.paths)
    assert inputs.modified == tuple(p.stat().st_mtime_ns for p in pop.paths)
    grown = dataclasses.replace(inputs, sizes=(inputs.sizes[0] + 1, *inputs.sizes[1:]))
    with pytest.raises(InputError, match="workers must read the same files"):
        executors.opened(grown)
    saved_again = dataclasses.replace(inputs, modified=(inputs.modified[0] - 1, *inputs.modified[1:]))
    with pytest.raises(InputError, match="workers must read the same files"):
        executors.opened(saved_again)
    assert executors._OPENED == {}  # nothing refused stays open
    older = dataclasses.replace(inputs, environment=(("unipack", "0.0.1"), *inputs.environment[1:]))
    with pytest.raises(ClusterError, match="unipack 0.1.0 on the worker, 0.0.1 in the merging process"):
        executors.opened(older)
    # the same numpy running other BLAS kernels (another CPU family) rounds sums otherwise
    blas = dict(inputs.environment)["blas"]
    assert blas.split()[0] in ("openblas", "mkl", "blis", "accelerate", "scipy-openblas") or blas == "unknown", blas
    elsewhere = dataclasses.replace(
        inputs, environment=tuple((k, v + " SkylakeX" if k == "blas" else v) for k, v in inputs.environment)
    )
    with pytest.raises(ClusterError, match=f"blas {blas} on the worker, {blas} SkylakeX in the merging process"):
        executors.opened(elsewhere)
    missing = dataclasses.replace(inputs, paths=tuple(f"/nonexistent/{p.name}" for p in pop.paths))
    with pytest.raises(InputError, match="workers read the inputs by path"):
        executors.opened(missing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wrong_ways_to_ask_for_dask(pop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "b.upk"
    args = ["merge", *pop.paths, "-o", out]
    for extra, words in (
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler is for --executor dask"),
        (["--executor", "dask"], "--executor dask needs --scheduler"),
        (["--executor", "dask", "--scheduler", "tcp://127.0.0.1:1", "--jobs", "2"], "--jobs is for --executor local"),
        (["--executor", "spark"], "'spark' is not one of 'local', 'dask'"),
    ):
        r = run(*args, *extra)
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    for kwargs, words in (
        ({"scheduler": "tcp://127.0.0.1:1"}, "--scheduler is for --executor dask"),
        ({"executor": "dask"}, "--executor dask needs --scheduler"),
        ({"executor": "dask", "scheduler": "tcp://127.0.0.1:1", "jobs": 2}, "--jobs is for --executor local"),
        ({"executor": "spark"}, "--executor 'spark'"),
    ):
        with pytest.raises(OptionsError, match=words):
            unipack.merge(pop.paths, out, **kwargs)  # type: ignore[arg-type]
    # neither an address nor an existing scheduler file
    line = assert_one_line_error(run(*args, *on(tmp_path / "nowhere.json")))
    assert "neither an address" in line and "nowhere.json" in line
    # nothing listens there: refused within the timeout, never a hang
    from unipack.pack import dask_cluster

    monkeypatch.setattr(dask_cluster, "CONNECT_TIMEOUT_S", 1.0)
    address = f"tcp://127.0.0.1:{free_port()}"
    line = assert_one_line_error(run(*args, *on(address)))
    assert f"--scheduler {address}: no Dask scheduler answered within 1 s" in line and "dask scheduler" in line
    # a scheduler without workers: said so, within the timeout
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        line = assert_one_line_error(run(*args, *on(empty.scheduler_address)))
    assert "the scheduler has no workers" in line and "dask worker" in line
    # dask not installed: the extra to install, exit 1
    monkeypatch.setitem(sys.modules, "distributed", None)
    line = assert_one_line_error(run(*args, *on(address)))
    assert "pip install 'unipack[dask]'" in line
    assert listing(tmp_path) == []


class Counting(Executor):
    """A serial executor that counts the jobs started and not yet taken."""

    window = 3

    def __init__(self) -> None:
        self.outstanding = self.most = 0

    def start(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)

        def wait() -> Any:
            self.outstanding -= 1
            return fn(*args)

        return wait


def test_in_order_keeps_at_most_a_window_of_jobs_in_flight(cluster) -> None:
    counting = Counting()
    assert list(counting.in_order(lambda x: x * x, [(i,) for i in range(10)])) == [i * i for i in range(10)]
    assert counting.most == 3
    from unipack.pack.dask_cluster import JOBS_PER_THREAD, DaskCluster

    with DaskCluster(cluster.scheduler_address) as dask:
        assert dask.window == JOBS_PER_THREAD * 2  # two workers of one thread
        # results come back in submission order, whatever order the workers finish in
        assert list(dask.in_order(time.sleep, [(0.05 * (i % 3),) for i in range(7)])) == [None] * 7


SLOW_WORKERS = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import distributed

    marker = Path(sys.argv[1])

    def slow() -> None:  # runs in each worker process: every tensor job waits, and says so
        import time
        from unipack.pack import dense
        choose = dense.Merger.unpatched = dense.Merger._choose_and_store
        def slowly(self, plan):
            marker.write_text("running")
            for _ in range(600):
                if marker.read_text() == "stop":
                    break
                time.sleep(0.1)
            return choose(self, plan)
        dense.Merger._choose_and_store = slowly

    distributed.Client(sys.argv[2]).run(slow)
    """
)


CLI = "import sys; from unipack.cli import main; sys.argv = ['unipack', *sys.argv[1:]]; main()"


def merging_a_slow_job(pop: Any, out_dir: Path, address: str, marker: Path, **popen: Any) -> subprocess.Popen[str]:
    """``unipack merge`` of ``pop`` into ``out_dir`` on the cluster at ``address``, in a child
    process (``popen``: more of its arguments), once a worker has started a tensor job that
    waits until ``marker`` says "stop" (``SLOW_WORKERS``)."""
    subprocess.run([sys.executable, "-c", SLOW_WORKERS, str(marker), address], check=True, timeout=60)
    child = subprocess.Popen(
        [sys.executable, "-c", CLI, "merge", *map(str, pop.paths), "-o", str(out_dir / "b.upk")] + on(address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    for _ in range(600):  # a worker has started a tensor job
        if marker.read_text() == "running" or child.poll() is not None:
            break
        time.sleep(0.1)
    if marker.read_text() != "running":
        marker.write_text("stop")
        child.kill()
        raise AssertionError(f"no tensor job started: {child.communicate(timeout=60)}")
    return child


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_cancels_the_jobs_and_writes_nothing(cluster, pop, tmp_path: Path) -> None:
    marker, out_dir = tmp_path / "marker", tmp_path / "out"
    out_dir.mkdir()
    marker.write_text("")
    address = cluster.scheduler_address
    client = distributed.Client(address, set_as_default=False)
    try:
        child = merging_a_slow_job(
            pop,
            out_dir,
            address,
            marker,
            start_new_session=True,
            # a parent that ignores SIGINT (a background shell) would pass that on: restore it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            os.killpg(child.pid, signal.SIGINT)
            _, err = child.communicate(timeout=60)
        finally:
            marker.write_text("stop")  # the job already running finishes (Dask cannot stop it)
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
        assert child.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert listing(out_dir) == []
        # every job of the merge cancelled: the scheduler forgets them (no worker keeps computing them)
        for _ in range(600):
            if not client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
                break
            time.sleep(0.1)
        assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0
    finally:
        client.run(_restore)
        client.close()


def _restore() -> None:
    from unipack.pack import dense

    dense.Merger._choose_and_store = dense.Merger.unpatched  # type: ignore[attr-defined]


def test_dask_is_imported_only_when_chosen(pop, tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import unipack, unipack.cli
        unipack.merge({[str(p) for p in pop.paths]!r}, {str(tmp_path / "b.upk")!r}, jobs=2)
        print(sorted(m for m in ("dask", "distributed", "unipack.pack.dask_cluster") if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_scheduler_that_dies_mid_merge_is_one_line_and_writes_nothing(pop, tmp_path: Path) -> None:
    """The scheduler killed while a job runs: the merge stops with one line naming the scheduler
    (no Dask log on stderr), exit 1, and leaves nothing behind; never a hang."""
    marker, out_dir, scheduler_file = tmp_path / "marker", tmp_path / "out", tmp_path / "scheduler.json"
    out_dir.mkdir()
    marker.write_text("")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0", "--dashboard-address", ":0"]
        + ["--scheduler-file", str(scheduler_file)],
        **quiet,
    )
    worker = None
    try:
        for _ in range(300):
            if scheduler_file.is_file() and scheduler_file.stat().st_size:
                break
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nthreads",
                "1",
                "--dashboard-address",
                ":0",
            ],
            **quiet,
        )
        with distributed.Client(address, set_as_default=False, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
        child = merging_a_slow_job(pop, out_dir, address, marker)
        try:
            scheduler.kill()
            _, err = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
    finally:
        marker.write_text("stop")
        for process in (worker, scheduler):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert child.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert f"--scheduler {address}: the Dask scheduler went away during the merge" in lines[0]
    assert "restart it and merge again" in lines[0]
    assert listing(out_dir) == []
