"""``merge --jobs N``: tensors fitted in forked workers give the serial merge's bundle byte for
byte (every storage, the alternatives meter, the lossless baseline), errors in a worker surface
as the same clean error, Ctrl-C ends the workers too, and torch checkpoints stay in-process."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TensorSpec, assert_members_within, listing, standard_specs, write_population
from safetensors.torch import load_file

import unipack
from unipack.cli import cli
from unipack.errors import InputError, OptionsError
from unipack.pack import dense, executors, parallel
from unipack.sources.checkpoint import close_all, open_inputs

SPECS = {
    **standard_specs(),
    "head.weight": TensorSpec((3, 12), kind="head"),  # shapes differ: raw per member
    "blocks.0.weight": TensorSpec((64, 96), kind="right", rank=3, scale=0.05),
    "blocks.1.weight": TensorSpec((96, 64), kind="noise", scale=0.02),
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pop(tmp_path_factory: pytest.TempPathFactory):
    return write_population(tmp_path_factory.mktemp("par") / "in", SPECS, n=5, seed=21)


@pytest.mark.parametrize(
    "options",
    [
        {},  # the default rule: deltas, subspaces, raw heads, exact buffers, the alternatives meter
        {"rank": 2, "lossless": "full"},  # subspaces at a fixed rank, the zstd -19 baseline per member
        {"max_error": 0.02, "quantize": False, "baselines": False},
        {"exact_tier": True},  # the lossless tier's residuals, made in each tensor's job
    ],
)
def test_two_jobs_write_the_serial_bundle_byte_for_byte(pop, tmp_path: Path, options: dict) -> None:
    serial, forked = tmp_path / "serial.upk", tmp_path / "forked.upk"
    unipack.merge(pop.paths, serial, jobs=1, **options)
    result = unipack.merge(pop.paths, forked, jobs=2, **options)
    assert digest(serial) == digest(forked)
    assert result.file_bytes == forked.stat().st_size
    # the bound each member was held to, checked on what the parallel bundle gives back
    bound = options.get("max_error", 0.05) if "rank" not in options else None
    assert_members_within(forked, pop, bound)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forked.upk", "serial.upk"]  # no spool left


def fake_sysconf(free_bytes: int):  # type: ignore[no-untyped-def]
    def sysconf(name: str) -> int:
        return {"SC_AVPHYS_PAGES": free_bytes // 4096, "SC_PAGE_SIZE": 4096}[name]

    return sysconf


def test_how_many_jobs(pop, tmp_path: Path, monkeypatch) -> None:
    checkpoints = open_inputs(pop.paths, None)
    try:
        assert parallel.effective_jobs(1, checkpoints, 10) == 1
        assert parallel.effective_jobs(3, checkpoints, 10) == 3
        assert parallel.effective_jobs(8, checkpoints, 2) == 2  # never more workers than tensors
        assert parallel.effective_jobs(4, checkpoints, 1) == 1
        # automatic: these inputs are far below PARALLEL_FROM_BYTES, so in-process
        assert sum(c.file_size for c in checkpoints) < parallel.PARALLEL_FROM_BYTES
        assert parallel.effective_jobs(None, checkpoints, 10) == 1
    finally:
        close_all(checkpoints)
    # automatic, on large inputs: every core, as far as the free memory holds the largest tensor
    # once per worker (its working set taken as WORKING_BYTES_PER_ELEMENT per element)
    checkpoints = open_inputs(pop.paths, None)
    try:
        largest = max(info.numel for info in checkpoints[0].tensors.values())
        per_job = largest * parallel.WORKING_BYTES_PER_ELEMENT
        for free_jobs in (1, 3):
            monkeypatch.setattr(parallel, "default_jobs", lambda: 8)
            monkeypatch.setattr(parallel.os, "sysconf", fake_sysconf(free_jobs * per_job + per_job // 2))
            assert parallel.effective_jobs(None, checkpoints, 10, from_bytes=0) == free_jobs
        monkeypatch.setattr(parallel.os, "sysconf", fake_sysconf(10**15))
        assert parallel.effective_jobs(None, checkpoints, 10, from_bytes=0) == 8
    finally:
        close_all(checkpoints)
    # torch checkpoints read through torch, which must not run in a forked child
    bins = []
    for i, path in enumerate(pop.paths):
        bins.append(tmp_path / f"m{i}.bin")
        torch.save(load_file(str(path)), bins[-1])
    checkpoints = open_inputs(bins, None)
    try:
        assert not any(c.fork_safe for c in checkpoints)
        assert parallel.effective_jobs(4, checkpoints, 10) == 1
    finally:
        close_all(checkpoints)


def test_an_error_in_a_worker_is_the_same_clean_error(pop, tmp_path: Path, monkeypatch) -> None:
    original = dense.Merger._choose_and_store

    def failing(self, plan):  # type: ignore[no-untyped-def]
        if plan.name == "blocks.1.weight":
            raise InputError(f"{plan.name}: refused on purpose")
        return original(self, plan)

    monkeypatch.setattr(dense.Merger, "_choose_and_store", failing)  # forked workers inherit it
    out = tmp_path / "out" / "b.upk"
    out.parent.mkdir()
    with pytest.raises(InputError, match="blocks.1.weight: refused on purpose"):
        unipack.merge(pop.paths, out, jobs=2)
    assert listing(out.parent) == []


def test_bad_job_counts_are_refused(pop, tmp_path: Path) -> None:
    for jobs in (0, -1, 1.5, True):
        with pytest.raises(OptionsError, match="--jobs"):
            unipack.merge(pop.paths, tmp_path / "b.upk", jobs=jobs)  # type: ignore[arg-type]
    r = CliRunner().invoke(cli, ["merge", *map(str, pop.paths), "-o", str(tmp_path / "b.upk"), "--jobs", "0"])
    assert r.exit_code == 2 and "--jobs" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b.upk").exists()


SLOW_WORKERS = textwrap.dedent(
    """
    import os, sys, time
    from unipack.pack import dense
    choose = dense.Merger._choose_and_store
    parent = os.getpid()
    def slow(self, plan):
        if os.getpid() != parent:  # in a worker
            print("ready", flush=True)
            time.sleep(60)
        return choose(self, plan)
    dense.Merger._choose_and_store = slow
    from unipack.cli import main
    sys.argv = ["unipack", *sys.argv[1:]]
    main()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_ends_the_workers_and_writes_nothing(pop, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # a new session: the test sends SIGINT to the whole group, as a terminal's Ctrl-C does
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_WORKERS,
            "merge",
            *map(str, pop.paths),
            "-o",
            str(out_dir / "b.upk"),
            "--jobs",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a parent that ignores SIGINT (a background shell) would pass that on: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert child.stdout is not None
        # both workers may say so at once (the lossless baseline no longer keeps one busy), and
        # their words may share a line
        assert child.stdout.readline().strip().startswith("ready")
        os.killpg(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert listing(out_dir) == []
    # no worker outlives the merge
    left = subprocess.run(["pgrep", "-g", str(child.pid)], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_rank_rule_members_read_back_identically(pop, tmp_path: Path) -> None:
    """The parallel bundle is the serial one; this checks the parallel one's members directly
    against the serial one's, tensor by tensor (bits), as a second, independent look."""
    a, b = tmp_path / "a.upk", tmp_path / "b.upk"
    unipack.merge(pop.paths, a, rank=1, jobs=1)
    unipack.merge(pop.paths, b, rank=1, jobs=2)
    with unipack.open(a) as x, unipack.open(b) as y:
        for name in pop.names:
            left, right = x.load_numpy(name), y.load_numpy(name)
            assert left.keys() == right.keys()
            for key, (dtype, array) in left.items():
                assert right[key][0] == dtype
                assert array.tobytes() == right[key][1].tobytes(), key


@pytest.mark.parametrize("options", [{}, {"rank": 2}])
def test_alternatives_measured_apart(pop, tmp_path: Path, monkeypatch, options: dict) -> None:
    """Large tensors' alternatives run as jobs of their own: the same bytes serial or forked, the
    same bundle and report numbers as when measured in the tensor's job (the paper's recipe on
    its own fit instead of the merge's rows models: equal to rounding)."""
    whole = tmp_path / "whole.upk"
    unipack.merge(pop.paths, whole, jobs=1, **options)
    monkeypatch.setattr(dense, "ALTERNATIVES_APART_FROM", 2000)  # the two 6144-element blocks
    serial, forked = tmp_path / "serial.upk", tmp_path / "forked.upk"
    unipack.merge(pop.paths, serial, jobs=1, **options)
    unipack.merge(pop.paths, forked, jobs=2, **options)
    assert digest(serial) == digest(forked)
    with unipack.open(whole) as a, unipack.open(serial) as b:
        assert a.manifest.tensors == b.manifest.tensors
        assert [m.resolved_numbers for m in a.manifest.members] == [m.resolved_numbers for m in b.manifest.members]
        before, after = a.manifest.stats["alternatives"], b.manifest.stats["alternatives"]
    assert after["tensors"] == before["tensors"] and after["cheapest"].keys() == before["cheapest"].keys()
    assert set(after["methods"]) == set(before["methods"])
    for method, numbers in before["methods"].items():
        if method == "paper-k16":
            assert after["methods"][method]["bytes"] == numbers["bytes"]
            assert after["methods"][method]["errors"] == pytest.approx(numbers["errors"], rel=1e-4)
        else:
            assert after["methods"][method] == numbers


def test_only_large_shared_tensors_are_measured_apart(pop, monkeypatch) -> None:
    from unipack.options import MergeOptions
    from unipack.pack.plan import plan_tensors

    monkeypatch.setattr(dense, "ALTERNATIVES_APART_FROM", 2000)
    checkpoints = open_inputs(pop.paths, None)
    try:
        options = MergeOptions()
        plans = plan_tensors(checkpoints, options)
        merger = dense.Merger(checkpoints, options, None, None)  # type: ignore[arg-type]
        items = merger._items(plans)
        apart = [item.plan.name for item in items if isinstance(item, dense.AlternativesItem)]
        assert apart == ["blocks.0.weight", "blocks.1.weight"]
        for index, item in enumerate(items):  # each right after its tensor's own job
            if isinstance(item, dense.AlternativesItem):
                assert items[index - 1] is item.plan
        assert [p for p in items if not isinstance(p, dense.AlternativesItem)] == plans
        no_report = dense.Merger(checkpoints, MergeOptions(baselines=False), None, None)  # type: ignore[arg-type]
        assert no_report._items(plans) == plans  # nothing to measure without the report's baselines
    finally:
        close_all(checkpoints)


class Counting(executors.Executor):
    """Runs each job when taken, counting the jobs started and not yet taken."""

    window = 2

    def __init__(self) -> None:
        self.outstanding = self.most = 0

    def start(self, fn, *args):  # type: ignore[no-untyped-def]
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)

        def wait():  # type: ignore[no-untyped-def]
            self.outstanding -= 1
            return fn(*args)

        return wait


@pytest.mark.parametrize(
    ("bounds", "most"),
    [
        (None, 2),  # a count of jobs: the window
        ([executors.PILE_BYTES + 1] * 12, 2),  # each could fill the pile alone: the window
        ([executors.PILE_BYTES // 3] * 12, 4),  # three fit behind the head
        ([10 * executors.PILE_BYTES] + [1] * 11, 12),  # a huge head, small results behind it: all start
        ([1] * 40, 2 * executors.PILE_JOBS),  # and never more than window x PILE_JOBS
    ],
)
def test_small_results_start_behind_a_slow_head(bounds: list[int] | None, most: int) -> None:
    counting = Counting()
    n = len(bounds) if bounds is not None else 12
    assert list(counting.in_order(lambda x: x * x, [(i,) for i in range(n)], bounds)) == [i * i for i in range(n)]
    assert counting.most == most and counting.outstanding == 0


def test_a_tensor_job_is_bounded_by_its_inputs(pop) -> None:
    from unipack.options import MergeOptions
    from unipack.pack.plan import plan_tensors

    checkpoints = open_inputs(pop.paths, None)
    try:
        plans = plan_tensors(checkpoints, MergeOptions())
        plan = next(p for p in plans if p.name == "blocks.0.weight")
        inputs = sum(c.tensors[plan.name].numel * 4 for c in checkpoints)  # float32 members
        merger = dense.Merger(checkpoints, MergeOptions(), None, None)  # type: ignore[arg-type]
        assert merger._result_bound(plan) == inputs + dense.RESULT_SLACK
        assert merger._result_bound(dense.AlternativesItem(plan)) == dense.RESULT_SLACK
        lossless = dense.Merger(checkpoints, MergeOptions(exact_tier=True), None, None)  # type: ignore[arg-type]
        assert lossless._result_bound(plan) == 2 * inputs + dense.RESULT_SLACK  # the residuals too
    finally:
        close_all(checkpoints)
