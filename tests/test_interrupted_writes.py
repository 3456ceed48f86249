"""Interrupted and failing writes: SIGKILL, disk full, Ctrl-C, bad inputs, concurrent readers.

Every write goes through ``unipack/format/atomic.py`` (temp file beside the target, fsync,
rename), so whatever happens to the writer, the target path holds either the previous file,
byte for byte, or the complete new one. After SIGKILL the dead process cannot remove its temp
and spool files (``.out.upk.*.tmp`` / ``.out.upk.*.spool``); the tests accept exactly those
names as leftovers and log them (at INFO: shown by ``pytest -rP`` or ``--log-cli-level=INFO``).
After a Python-level failure (an exception, disk full, KeyboardInterrupt) nothing may be left
behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

import unipack
from unipack import FormatError, InputError, UnipackError

# conftest helpers are imported inside functions: the spawned reader processes import this
# module and should not pay for torch.

# diagnostics (kill moments, leftovers, reader rounds): INFO records, captured like output and
# shown on request by `pytest -rP` ("Captured log call") or live by `--log-cli-level=INFO`
logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)

BIG_TENSORS = 10  # 6 members x 10 float32 512x512 tensors: a merge of about 2 s here (more when loaded)
N_MEMBERS = 6
LEFTOVER = re.compile(r"^\.out\.upk\.[A-Za-z0-9_]+\.(tmp|spool)$")
EXTRACT_LEFTOVER = re.compile(r"^\.target\.safetensors\.[A-Za-z0-9_]+\.tmp$")
# the writers' lock file (format/atomic.py, bundle_lock), left behind by a merge killed in its final write
LOCK_LEFTOVER = "out.upk.lock"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _big_specs(n_tensors: int, size: int = 512) -> dict[str, Any]:
    from conftest import TensorSpec

    return {f"layer{i}.weight": TensorSpec((size, size), kind="right", rank=4) for i in range(n_tensors)}


def _population(directory: Path, n_tensors: int, *, n: int = N_MEMBERS, seed: int = 0, size: int = 512) -> list[Path]:
    from conftest import write_population

    return list(write_population(directory, _big_specs(n_tensors, size), n=n, seed=seed).paths)


def _dotfiles(directory: Path) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.startswith("."))


def _bundle_digests(path: Path) -> dict[str, dict[str, str]]:
    """``{member: {tensor: sha256(dtype, shape, bytes)}}``: opens ``path`` and loads every member."""
    out: dict[str, dict[str, str]] = {}
    with unipack.open(path) as b:
        for m in b.members:
            out[m] = {name: _array_digest(dtype, arr) for name, (dtype, arr) in b.load_numpy(m).items()}
    return out


def _array_digest(dtype: str, arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{dtype}{list(arr.shape)}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class CountingProgress:
    """A ``progress=`` object that counts calls and can raise after ``interrupt_after`` reads."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.starts = 0
        self.tensors = 0
        self.reads = 0
        self.interrupt_after = interrupt_after

    def start(self, n_tensors: int, n_members: int) -> None:
        self.starts += 1

    def tensor(self, index: int, name: str) -> None:
        self.tensors += 1

    def member_read(self) -> None:
        self.reads += 1
        if self.interrupt_after is not None and self.reads >= self.interrupt_after:
            raise KeyboardInterrupt

    def lossless(self, done: int, total: int) -> None:
        pass


def _open_fds_to(paths: list[Path]) -> list[str]:
    targets = {str(p.resolve()) for p in paths}
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link in targets or ".spool" in link or link.endswith(".tmp"):
                found.append(link)
    return found


# --------------------------------------------------------------------------------------------
# a shared big population and its reference bundle
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("big")
    paths = _population(root / "in", BIG_TENSORS)
    ref = root / "ref" / "ref.upk"
    ref.parent.mkdir()
    # The baselines' measurements (zstd -19 of the inputs, per-member SVDs) are off: this file
    # is about atomic writes, and a short merge lets the kills land at many moments.
    unipack.merge(paths, ref, lossless="off", baselines=False)
    # a different, valid bundle: the "previous" out.upk that a forced merge replaces
    old_paths = _population(root / "old_in", 2, n=3, seed=7, size=64)
    old = root / "ref" / "old.upk"
    unipack.merge(old_paths, old)
    return {
        "paths": paths,
        "ref": ref,
        "ref_bytes": ref.read_bytes(),
        "ref_digests": _bundle_digests(ref),
        "old": old,
        "old_bytes": old.read_bytes(),
        "old_digests": _bundle_digests(old),
    }


# --------------------------------------------------------------------------------------------
# 1. SIGKILL during merge
# --------------------------------------------------------------------------------------------

MERGE_CHILD = r"""
import json, sys
import unipack
args = json.loads(sys.argv[1])
print("ready", flush=True)
unipack.merge(args["paths"], args["out"], force=True, lossless="off", baselines=False)
print("done", flush=True)
"""

EXTRACT_CHILD = r"""
import json, sys
import unipack
args = json.loads(sys.argv[1])
b = unipack.open(args["bundle"])
print("ready", flush=True)
b.extract(args["member"], args["out"], force=True)
print("done", flush=True)
"""


def _spawn(script: str, args: dict[str, Any]) -> tuple[subprocess.Popen[str], float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child did not start: {line!r} {err}")
    return proc, time.perf_counter()


def _timed_run(script: str, args: dict[str, Any], watch: Path, tmp_prefix: str) -> tuple[float, float]:
    """Run the child to completion: (seconds from ready to done, seconds until its temp file appeared)."""
    proc, t0 = _spawn(script, args)
    t_tmp = None
    while proc.poll() is None:
        if t_tmp is None and any(n.startswith(tmp_prefix) and n.endswith(".tmp") for n in os.listdir(watch)):
            t_tmp = time.perf_counter() - t0
        time.sleep(0.0005)
    total = time.perf_counter() - t0
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "done" in out
    assert t_tmp is not None, "never saw the temp file appear"
    return total, t_tmp


def _kill_at(
    script: str, args: dict[str, Any], *, delay: float | None, watch: Path, tmp_prefix: str, after_tmp: float = 0.0
) -> int:
    """Start the child; SIGKILL it ``delay`` s after it is ready, or ``after_tmp`` s after its temp file appears."""
    proc, t0 = _spawn(script, args)
    try:
        if delay is not None:
            time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
        else:
            while proc.poll() is None and not any(
                n.startswith(tmp_prefix) and n.endswith(".tmp") for n in os.listdir(watch)
            ):
                time.sleep(0.0002)
            if after_tmp:
                time.sleep(after_tmp)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def _moments(total: float, t_tmp: float) -> list[tuple[str, float | None, float]]:
    """5 moments spread from start to near the end, plus 2 inside the final write (temp file present)."""
    spread = [("t=%.2fs" % (total * f), total * f, 0.0) for f in (0.05, 0.27, 0.5, 0.72, 0.95)]
    finish = max(total - t_tmp, 0.0)
    inside = [("tmp appeared + %.3fs" % (finish * f), None, finish * f) for f in (0.0, 0.5)]
    return spread + inside


def test_sigkill_during_merge(big: dict[str, Any], tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.upk"
    args = {"paths": [str(p) for p in big["paths"]], "out": str(out)}

    total, t_tmp = _timed_run(MERGE_CHILD, args, out_dir, ".out.upk.")
    assert out.read_bytes() == big["ref_bytes"], "a child merge differs from the in-process one"
    assert _dotfiles(out_dir) == []
    out.unlink()

    report = [f"full merge in child: {total:.2f}s, temp file appeared at {t_tmp:.2f}s"]
    outcomes = {"old": 0, "new": 0, "absent": 0}
    killed = 0
    scenarios = [(True, m) for m in _moments(total, t_tmp)]
    # without a previous out.upk: mid-merge, and inside the final write
    moments = _moments(total, t_tmp)
    scenarios += [(False, moments[2]), (False, moments[5])]
    for had_old, (label, delay, after_tmp) in scenarios:
        if had_old:
            shutil.copyfile(big["old"], out)
        rc = _kill_at(MERGE_CHILD, args, delay=delay, watch=out_dir, tmp_prefix=".out.upk.", after_tmp=after_tmp)
        for _ in range(2):
            # The machine is shared: a child that ran faster than the timed one finished before
            # its kill. Again, earlier (its complete output is checked below as well).
            if rc == -signal.SIGKILL or delay is None:
                break
            delay *= 0.6
            for n in _dotfiles(out_dir):
                (out_dir / n).unlink()
            if had_old:
                shutil.copyfile(big["old"], out)
            else:
                with contextlib.suppress(FileNotFoundError):
                    out.unlink()
            rc = _kill_at(MERGE_CHILD, args, delay=delay, watch=out_dir, tmp_prefix=".out.upk.", after_tmp=after_tmp)
        killed += rc == -signal.SIGKILL
        left = _dotfiles(out_dir)
        assert all(LEFTOVER.match(n) for n in left), f"{label}: unexpected files {left}"
        assert sorted(set(os.listdir(out_dir)) - set(left) - {LOCK_LEFTOVER}) in ([], ["out.upk"])
        if not out.exists():
            assert not had_old, f"{label}: the previous out.upk vanished"
            state = "absent"
        else:
            data = out.read_bytes()
            if had_old and data == big["old_bytes"]:
                assert _bundle_digests(out) == big["old_digests"]
                state = "old"
            else:
                assert data == big["ref_bytes"], (
                    f"{label}: out.upk ({len(data)} bytes) is neither the previous bundle nor the complete new one"
                )
                assert _bundle_digests(out) == big["ref_digests"]
                state = "new"
        outcomes[state] += 1
        report.append(
            f"  kill at {label:<24} (existing out.upk: {had_old!s:<5}) rc={rc}: out.upk {state}; leftovers: {left}"
        )
        for n in left:
            (out_dir / n).unlink()
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
    logger.info("[sigkill merge]\n%s\n  outcomes: %s", "\n".join(report), outcomes)
    assert killed >= len(scenarios) - 2, "most kills should land before the merge finishes"


# --------------------------------------------------------------------------------------------
# 2. SIGKILL during extract
# --------------------------------------------------------------------------------------------


def test_sigkill_during_extract(big: dict[str, Any], tmp_path: Path) -> None:
    bundle = big["ref"]
    with unipack.open(bundle) as b:
        member, other = b.members[0], b.members[1]
        b.extract(member, tmp_path / "ref.safetensors")
        b.extract(other, tmp_path / "old.safetensors")
    new_bytes = (tmp_path / "ref.safetensors").read_bytes()
    old_bytes = (tmp_path / "old.safetensors").read_bytes()
    assert new_bytes != old_bytes and len(new_bytes) == len(old_bytes)  # partial writes would be invisible by size

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "target.safetensors"
    args = {"bundle": str(bundle), "member": member, "out": str(target)}
    target.write_bytes(old_bytes)
    total, t_tmp = _timed_run(EXTRACT_CHILD, args, out_dir, ".target.safetensors.")
    assert target.read_bytes() == new_bytes

    report = [f"full extract in child: {total * 1000:.0f}ms, temp file appeared at {t_tmp * 1000:.0f}ms"]
    outcomes = {"old": 0, "new": 0}
    for label, delay, after_tmp in _moments(total, t_tmp):
        target.write_bytes(old_bytes)
        rc = _kill_at(
            EXTRACT_CHILD, args, delay=delay, watch=out_dir, tmp_prefix=".target.safetensors.", after_tmp=after_tmp
        )
        left = _dotfiles(out_dir)
        assert all(EXTRACT_LEFTOVER.match(n) for n in left), f"{label}: unexpected files {left}"
        data = target.read_bytes()
        assert data in (old_bytes, new_bytes), f"{label}: the target is partial ({len(data)} bytes, mixed content)"
        state = "old" if data == old_bytes else "new"
        outcomes[state] += 1
        report.append(f"  kill at {label:<24} rc={rc}: target {state}; leftovers: {left}")
        for n in left:
            (out_dir / n).unlink()
    logger.info("[sigkill extract]\n%s\n  outcomes: %s", "\n".join(report), outcomes)


# --------------------------------------------------------------------------------------------
# 3. disk full: injected, and real (a small tmpfs)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("small")
    paths = _population(root / "in", 4, n=4, seed=3, size=256)
    ref = root / "ref.upk"
    unipack.merge(paths, ref, codec="none")
    return {"paths": paths, "ref": ref, "size": ref.stat().st_size}


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_disk_full_error(exc: BaseException, path: Path) -> None:
    msg = str(exc)
    assert isinstance(exc, UnipackError), f"{type(exc).__name__} is not a UnipackError: {msg}"
    assert str(path) in msg, msg
    assert "no space" in msg.lower() and "fail" in msg.lower(), msg


class _FailingFile:
    """Wraps the atomic temp file: writes succeed until ``limit`` bytes, then ENOSPC."""

    def __init__(self, f: Any, limit: int) -> None:
        self._f, self._limit, self.written = f, limit, 0

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if self.written + n > self._limit:
            room = max(self._limit - self.written, 0)
            self._f.write(memoryview(data).cast("B")[:room])
            self.written += room
            raise _enospc()
        self.written += n
        return self._f.write(data)

    def __enter__(self) -> _FailingFile:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def test_disk_full_injected_during_merge_finish(small: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out.upk"
    out.write_bytes(b"previous bundle bytes" * 100)
    before = out.read_bytes()
    real_copy = shutil.copyfileobj

    def copy_half_then_fail(src: Any, dst: Any, length: int = 0) -> None:
        dst.write(src.read(small["size"] // 2))
        raise _enospc()

    with mock.patch("unipack.format.container.shutil.copyfileobj", copy_half_then_fail):
        with pytest.raises(BaseException) as info:
            unipack.merge(small["paths"], out, force=True, codec="none")
    _assert_disk_full_error(info.value, out)
    assert _dotfiles(tmp_path) == [], "temp or spool file left behind"
    assert out.read_bytes() == before
    assert shutil.copyfileobj is real_copy
    assert _open_fds_to(small["paths"]) == []


def test_disk_full_injected_during_spool_write(small: dict[str, Any], tmp_path: Path) -> None:
    """The spool (scratch file beside the output) filling the disk mid-merge: same contract."""
    out = tmp_path / "out.upk"
    out.write_bytes(b"previous bundle bytes" * 100)
    before = out.read_bytes()
    real_fdopen = os.fdopen
    wrapped: list[_FailingFile] = []

    def fdopen(fd: int, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = real_fdopen(fd, mode, *a, **k)
        if mode == "w+b":  # the spool file
            wrapped.append(_FailingFile(f, small["size"] // 2))
            return wrapped[-1]
        return f

    with mock.patch("unipack.format.atomic.os.fdopen", fdopen):
        with pytest.raises(BaseException) as info:
            unipack.merge(small["paths"], out, force=True, codec="none")
    assert wrapped and wrapped[0].written == small["size"] // 2, "the failure was not injected mid-spool"
    assert _dotfiles(tmp_path) == [], "temp or spool file left behind"
    assert out.read_bytes() == before
    assert _open_fds_to(small["paths"]) == []
    _assert_disk_full_error(info.value, out)


def test_disk_full_injected_during_extract(small: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "member.safetensors"
    target.write_bytes(b"an older extraction" * 1000)
    before = target.read_bytes()
    real_fdopen = os.fdopen
    wrapped: list[_FailingFile] = []

    def fdopen(fd: int, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = real_fdopen(fd, mode, *a, **k)
        if mode == "wb":  # the atomic temp file (the spool is "w+b")
            wrapped.append(_FailingFile(f, 300_000))
            return wrapped[-1]
        return f

    with unipack.open(small["ref"]) as b:
        member = b.members[2]
        with mock.patch("unipack.format.atomic.os.fdopen", fdopen):
            with pytest.raises(BaseException) as info:
                b.extract(member, target, force=True)
        assert wrapped and wrapped[0].written == 300_000, "the failure was not injected mid-write"
        _assert_disk_full_error(info.value, target)
        assert _dotfiles(tmp_path) == []
        assert target.read_bytes() == before
        # and the bundle is still usable afterwards
        b.extract(member, target, force=True)
    assert target.read_bytes() != before


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    """``mount(size_bytes) -> Path``: a real small tmpfs (root only); skipped where mount fails."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
        )
        if r.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); "
                f"the injected disk-full tests cover this"
            )
        mounted.append(where)
        return where

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8); the injected disk-full tests cover this")
    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("where", ["final_write", "spool"])
def test_disk_full_real_tmpfs_merge(small: dict[str, Any], tmpfs: Any, where: str) -> None:
    size = small["size"]
    old = b"previous bundle bytes" * 2000  # ~42 kB
    # room for the old file + the spool + half the final file, or for the old file + half the spool
    room = len(old) + (size + size // 2 if where == "final_write" else size // 2)
    mnt = tmpfs(room + 64 * 1024)
    out = mnt / "out.upk"
    out.write_bytes(old)
    free_before = _free(mnt)
    with pytest.raises(BaseException) as info:
        unipack.merge(small["paths"], out, force=True, codec="none")
    left = _dotfiles(mnt)
    intact = out.read_bytes() == old
    assert left == [], f"temp or spool file left behind: {left}"
    assert intact, "the previous out.upk was damaged"
    assert _free(mnt) == free_before, "space not given back"
    _assert_disk_full_error(info.value, out)


def test_disk_full_real_tmpfs_extract(small: dict[str, Any], tmpfs: Any) -> None:
    with unipack.open(small["ref"]) as b:
        member = b.members[0]
        need = sum(int(np.prod(s)) * 4 for s in [(256, 256)] * 4)
        old = b"an older extraction" * 2000
        mnt = tmpfs(len(old) + need // 2 + 64 * 1024)
        target = mnt / "member.safetensors"
        target.write_bytes(old)
        with pytest.raises(BaseException) as info:
            b.extract(member, target, force=True)
    _assert_disk_full_error(info.value, target)
    assert _dotfiles(mnt) == []
    assert target.read_bytes() == old


# --------------------------------------------------------------------------------------------
# 4. Ctrl-C (KeyboardInterrupt) during merge
# --------------------------------------------------------------------------------------------


def test_keyboard_interrupt_during_merge(small: dict[str, Any], tmp_path: Path) -> None:
    probe = CountingProgress()
    unipack.merge(small["paths"], tmp_path / "probe.upk", progress=probe, codec="none")
    (tmp_path / "probe.upk").unlink()
    assert probe.reads >= 4, probe.reads

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.upk"
    unipack.merge(small["paths"][:2], out, codec="none")  # a valid previous bundle
    before = out.read_bytes()
    for after in sorted({1, probe.reads // 2, probe.reads}):
        progress = CountingProgress(interrupt_after=after)
        with pytest.raises(KeyboardInterrupt):
            unipack.merge(small["paths"], out, force=True, progress=progress, codec="none")
        assert progress.reads == after
        assert _dotfiles(out_dir) == [], f"interrupt after {after} reads left {_dotfiles(out_dir)}"
        assert os.listdir(out_dir) == ["out.upk"]
        assert out.read_bytes() == before
        assert _open_fds_to(small["paths"]) == []
    assert _bundle_digests(out)  # still opens and loads


def test_keyboard_interrupt_during_final_write(small: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out.upk"
    unipack.merge(small["paths"][:2], out, codec="none")
    before = out.read_bytes()

    def copy_some_then_interrupt(src: Any, dst: Any, length: int = 0) -> None:
        dst.write(src.read(small["size"] // 3))
        raise KeyboardInterrupt

    with mock.patch("unipack.format.container.shutil.copyfileobj", copy_some_then_interrupt):
        with pytest.raises(KeyboardInterrupt):
            unipack.merge(small["paths"], out, force=True, codec="none")
    assert _dotfiles(tmp_path) == []
    assert out.read_bytes() == before


# --------------------------------------------------------------------------------------------
# 5. a bad input member is named before any heavy work
# --------------------------------------------------------------------------------------------


def _corrupt(kind: str, path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated_half":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage_header":
        n = int.from_bytes(data[:8], "little")
        garbage = np.random.default_rng(5).bytes(n)
        path.write_bytes(data[:8] + garbage + data[8 + n :])
    elif kind == "different_tensors":
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        tensors["extra.weight"] = torch.zeros(4, 4)
        save_file(tensors, str(path))
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated_half", "garbage_header", "different_tensors"])
def test_bad_last_member_named_before_any_heavy_work(tmp_path: Path, kind: str) -> None:
    from unipack.sources.checkpoint import Checkpoint

    paths = _population(tmp_path / "in", 3, n=6, seed=11, size=128)
    bad = paths[-1]
    _corrupt(kind, bad)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.upk"
    progress = CountingProgress()
    real_read = Checkpoint.read
    data_reads = []

    def counting_read(self: Checkpoint, tensor: str) -> np.ndarray:
        data_reads.append((self.name, tensor))
        return real_read(self, tensor)

    with mock.patch.object(Checkpoint, "read", counting_read):
        with pytest.raises(UnipackError) as info:
            unipack.merge(paths, out, progress=progress)
    assert isinstance(info.value, (InputError, FormatError)), type(info.value)
    assert str(bad) in str(info.value), str(info.value)
    assert not any(str(p) in str(info.value) for p in paths[:-1] if kind != "different_tensors"), str(info.value)
    assert progress.reads == 0 and progress.tensors == 0, "tensor data was read before the bad member was found"
    assert data_reads == [], f"tensor data was read before validation failed: {data_reads[:3]}"
    assert os.listdir(out_dir) == []
    assert _open_fds_to(paths) == []


# --------------------------------------------------------------------------------------------
# 6. concurrent readers of one bundle
# --------------------------------------------------------------------------------------------


def _reader(path: str, seconds: float, barrier: Any, queue: Any) -> None:
    try:
        with unipack.open(path) as b:
            barrier.wait(timeout=60)
            end = time.perf_counter() + seconds
            rounds, seen = 0, None
            while True:
                digests = {m: {n: _array_digest(d, a) for n, (d, a) in b.load_numpy(m).items()} for m in b.members}
                if seen is None:
                    seen = digests
                elif digests != seen:
                    raise AssertionError(f"round {rounds}: results changed between rounds")
                rounds += 1
                if time.perf_counter() >= end:
                    break
        queue.put((os.getpid(), rounds, seen, None))
    except BaseException as exc:  # report everything to the parent
        queue.put((os.getpid(), 0, None, f"{type(exc).__name__}: {exc}"))


def test_concurrent_readers(small: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "shared.upk"
    unipack.merge(small["paths"], bundle)  # zstd: exercises decoding too
    expected = _bundle_digests(bundle)
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier = ctx.Barrier(n)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(str(bundle), 2.0, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in range(n)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r[3] for r in results if r[3]]
    assert errors == []
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for _, rounds, seen, _ in results:
        assert rounds >= 1
        assert seen == expected
    assert _dotfiles(tmp_path) == []
    logger.info("[concurrent readers] rounds per process: %s", [r[1] for r in results])
