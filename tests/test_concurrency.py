"""Concurrent writers and readers of one bundle (issue 16, item 2).

Writers of one bundle are serialized by its lock (``<bundle>.lock``, ``format/atomic.py``
``bundle_lock``): ``add`` holds it from reading the bundle until its grown bundle is renamed
into place, and every bundle write holds it for its final rename. Readers take no lock: a
bundle is only ever replaced by a rename, and a reader reads header, manifest and blobs through
the one descriptor it opened. So: no add is lost, no writer fails, and no reader sees a torn
bundle (a header of one file with the data of another looks like a checksum mismatch).

The figures (rounds, adds, opens, errors) are logged at INFO: ``pytest -rP`` shows them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import unipack

# conftest helpers are imported inside functions: the spawned workers import this module.

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)

WRITERS = 3  # processes running `unipack add`, each adding its own members
ADDS_PER_WRITER = 8  # 24 adds in all, as in the report
READERS = 2  # processes looping open + load + (now and then) verify
VERIFY_EVERY = 10  # a reader's rounds between two full verifies (every blob, every member)
TIME_CAP = 45.0  # seconds; the run takes a few seconds where nothing is wrong


def _writer(bundle: str, jobs: list[tuple[str, str]], barrier: Any, queue: Any) -> None:
    """``unipack add BUNDLE SOURCE --name NAME`` for each job, through the CLI (exit codes count)."""
    from click.testing import CliRunner

    from unipack.cli import cli

    outcomes = []
    try:
        barrier.wait(timeout=120)
        for name, source in jobs:
            result = CliRunner().invoke(cli, ["add", bundle, source, "--name", name, "--json"])
            outcomes.append((name, result.exit_code, result.stderr.strip()))
        queue.put(("writer", os.getpid(), outcomes, None))
    except BaseException as exc:  # report everything to the parent
        queue.put(("writer", os.getpid(), outcomes, f"{type(exc).__name__}: {exc}"))


def _reader(bundle: str, done: Any, barrier: Any, queue: Any, cap: float) -> None:
    """Open, load one member (a different one each round), close; a full verify every
    ``VERIFY_EVERY`` rounds; again, until the writers are done (and one round more)."""
    counts = {"rounds": 0, "loads": 0, "verifies": 0}
    errors: list[str] = []
    members_seen: set[int] = set()
    try:
        with unipack.open(bundle) as b:  # warm up (torch's import on the first load) before the start
            b.load(b.members[0])
        barrier.wait(timeout=120)
        end = time.perf_counter() + cap
        last = False
        while not last and time.perf_counter() < end:
            last = done.is_set()  # one round more after the writers finished
            try:
                with unipack.open(bundle) as b:
                    members_seen.add(len(b.members))
                    b.load(b.members[counts["rounds"] % len(b.members)])
                    counts["loads"] += 1
                    if counts["rounds"] % VERIFY_EVERY == 0 or last:
                        errors.extend(b.verify())
                        counts["verifies"] += 1
            except unipack.UnipackError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            counts["rounds"] += 1
    except BaseException as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    queue.put(("reader", os.getpid(), {**counts, "seen": sorted(members_seen)}, errors))


def _digests(bundle: Path, members: list[str]) -> dict[str, dict[str, bytes]]:
    with unipack.open(bundle) as b:
        return {m: {k: np.ascontiguousarray(a).tobytes() for k, (_, a) in b.load_numpy(m).items()} for m in members}


def test_concurrent_adds_and_readers(tmp_path: Path) -> None:
    from conftest import small_specs, write_population

    pop = write_population(tmp_path / "in", small_specs(), n=6, seed=4)
    home = tmp_path / "bundle"
    home.mkdir()
    bundle = home / "b.upk"
    unipack.merge(pop.paths[:2], bundle, lossless="off", baselines=False)
    # Each added member is the projection of its source onto the bundle's bases, which adds never
    # change: whatever the order, a member added from source k must load as it does when added alone.
    sources = pop.paths[2:]
    reference = tmp_path / "reference.upk"
    shutil.copyfile(bundle, reference)
    for k, source in enumerate(sources):
        unipack.add(reference, source, name=f"ref{k}")
    expected = _digests(reference, [f"ref{k}" for k in range(len(sources))])

    jobs = {
        w: [(f"w{w}_{j}", str(sources[(w + j) % len(sources)])) for j in range(ADDS_PER_WRITER)] for w in range(WRITERS)
    }
    ctx = multiprocessing.get_context("spawn")
    barrier, queue, done = ctx.Barrier(WRITERS + READERS + 1), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(bundle), jobs[w], barrier, queue)) for w in range(WRITERS)]
    procs += [ctx.Process(target=_reader, args=(str(bundle), done, barrier, queue, TIME_CAP)) for _ in range(READERS)]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=120)  # every worker has imported unipack
        started = time.perf_counter()
        writers = [queue.get(timeout=TIME_CAP + 60) for _ in range(WRITERS)]
        write_seconds = time.perf_counter() - started
        done.set()
        readers = [queue.get(timeout=TIME_CAP + 60) for _ in range(READERS)]
    finally:
        done.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(kind == "writer" for kind, *_ in writers) and all(kind == "reader" for kind, *_ in readers)

    failed = [(name, code, err) for _, _, outcomes, _ in writers for name, code, err in outcomes if code != 0]
    crashed = [crash for _, _, _, crash in writers if crash]
    adds = sum(len(outcomes) for _, _, outcomes, _ in writers)
    totals = {key: sum(r[key] for _, _, r, _ in readers) for key in ("rounds", "loads", "verifies")}
    reader_errors = [e for _, _, _, errors in readers for e in errors]
    seen = sorted({n for _, _, r, _ in readers for n in r["seen"]})
    logger.info(
        "[concurrent add] %d writers x %d adds: %d done, %d failed, in %.1fs; %d readers: %d rounds "
        "(open + load), %d full verifies, %d errors; member counts seen by readers: %s",
        WRITERS,
        ADDS_PER_WRITER,
        adds,
        len(failed),
        write_seconds,
        READERS,
        totals["rounds"],
        totals["verifies"],
        len(reader_errors),
        seen,
    )
    assert not crashed, crashed
    assert failed == [], failed  # every add exited 0
    assert adds == WRITERS * ADDS_PER_WRITER
    assert reader_errors == [], reader_errors[:5]  # no false "checksum mismatch", no torn read
    assert len(seen) > 2, "the readers should have seen the bundle grow while the adds ran"

    added = [name for w in range(WRITERS) for name, _ in jobs[w]]
    with unipack.open(bundle) as b:
        assert sorted(b.members) == sorted(["ft0", "ft1", *added])  # no lost update
        assert b.members[:2] == ["ft0", "ft1"]
        assert b.verify() == []
    got = _digests(bundle, added)
    for w in range(WRITERS):
        for name, source in jobs[w]:
            assert got[name] == expected[f"ref{sources.index(Path(source))}"], name
    assert os.listdir(home) == ["b.upk"]  # no lock, temp or spool file left


# A writer that holds the bundle's lock (as an add does between its read and its rename) while
# another process writes the bundle: the second must wait, and a signal must end the wait cleanly.
WRITE_CHILD = textwrap.dedent(
    """
    import sys
    from unipack.cli import main
    print("ready", flush=True)
    sys.argv = ["unipack", *sys.argv[1:]]
    main()
    """
)


def _waiting_on_flock(pid: int) -> bool:
    """Whether ``pid`` is blocked on an flock (``/proc/locks`` lists waiters as ``-> FLOCK``)."""
    with open("/proc/locks") as f:
        # "1: -> FLOCK  ADVISORY  WRITE <pid> <device:inode> 0 EOF"
        return any(line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid) for line in f)


def _start_waiting(args: list[str]) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITE_CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "UNIPACK_DEBUG": ""},
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    deadline = time.perf_counter() + 30
    while not _waiting_on_flock(child.pid):
        assert child.poll() is None, child.communicate()
        assert time.perf_counter() < deadline, "the writer never waited for the lock"
        time.sleep(0.02)
    return child


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux's /proc/locks to see a waiting lock")
def test_writers_wait_for_the_bundle_lock(tmp_path: Path) -> None:
    """``add`` and ``merge --force`` onto a bundle whose lock is held wait for it (and change
    nothing meanwhile); SIGTERM ends the wait with exit 143 and leaves nothing behind."""
    from conftest import small_specs, write_population

    from unipack.cli.commands import INTERRUPTED
    from unipack.format.atomic import bundle_lock

    pop = write_population(tmp_path / "in", small_specs(), n=4, seed=5)
    home = tmp_path / "bundle"
    home.mkdir()
    bundle = home / "b.upk"
    unipack.merge(pop.paths[:2], bundle, lossless="off", baselines=False)
    before = bundle.read_bytes()
    merge_args = [
        "merge",
        *map(str, pop.paths[1:3]),
        "-o",
        str(bundle),
        "--force",
        "-q",
        "--lossless-baseline",
        "off",
        "--no-baselines",
    ]
    with bundle_lock(bundle):
        waiting_add = _start_waiting(["add", str(bundle), str(pop.paths[3]), "--name", "late"])
        time.sleep(0.5)
        assert waiting_add.poll() is None and bundle.read_bytes() == before
        waiting_merge = _start_waiting(merge_args)
        terminated = _start_waiting(["add", str(bundle), str(pop.paths[2]), "--name", "never"])
        terminated.terminate()
        _, err = terminated.communicate(timeout=30)
        assert terminated.returncode == 143, err
        assert err.strip().splitlines()[-1] == INTERRUPTED.replace("interrupted", "terminated by SIGTERM")
        assert "Traceback" not in err
        assert bundle.read_bytes() == before
        # our lock file, and the spool of the merge waiting to write (nothing of the terminated add)
        listed = sorted(os.listdir(home))
        assert [n for n in listed if not n.startswith(".")] == ["b.upk", "b.upk.lock"]
        assert len(listed) == 3 and listed[0].startswith(".b.upk.unipack_") and listed[0].endswith(".spool")
    for child in (waiting_add, waiting_merge):
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    with unipack.open(bundle) as b:
        # the add and the merge ran one after the other, in whichever order they got the lock
        assert b.members in (["ft1", "ft2"], ["ft1", "ft2", "late"]) and b.verify() == []
    assert os.listdir(home) == ["b.upk"]
