"""Atomic file output: write a temp file beside the target, fsync it, rename it into place.

A reader never sees a half-written file, an interrupted write leaves the old file untouched,
and a failure (disk full, Ctrl-C, an exception) removes the temp file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputExistsError, UnipackError


def check_writable(path: Path, *, force: bool) -> None:
    """Refuse early (before any heavy work) if ``path`` exists and ``force`` is not set."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; pass --force (force=True) to overwrite it")
    if path.exists() and path.is_dir():
        raise OutputExistsError(f"{path}: is a directory; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UnipackError(f"{path}: directory {parent} does not exist; create it first")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, force: bool) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it replaces ``path`` atomically, otherwise it is removed."""
    target = Path(path)
    check_writable(target, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; the output should get the permissions a plain open() would give.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if target.exists() and not force:  # appeared while we were writing
            raise OutputExistsError(f"{target}: appeared while writing; pass --force to overwrite it")
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise UnipackError(f"{target}: write failed ({exc.strerror or exc}); the previous file, "
                               f"if any, is intact") from None
        raise
    _fsync_dir(target.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (a crash right after could otherwise lose it)."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def spool_file(directory: Path, stem: str) -> Iterator[BinaryIO]:
    """A scratch file beside the output (same filesystem), always removed afterwards.

    It lives beside the output so the final copy stays on one filesystem; a full disk there is
    the common failure, and it is reported like any failed write.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".spool", dir=directory)
    except OSError as exc:
        raise UnipackError(f"{directory / stem}: cannot create a scratch file in {directory} "
                           f"({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
    except OSError as exc:
        raise UnipackError(f"{directory / stem}: write failed ({exc.strerror or exc}) while spooling "
                           f"blobs; the previous file, if any, is intact") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
