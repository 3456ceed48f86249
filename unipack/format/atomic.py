"""Atomic file output: write a temp file beside the target, fsync it, rename it into place.

A reader never sees a half-written file, an interrupted write leaves the old file untouched,
and a failure (disk full, Ctrl-C, an exception) removes the temp file. ``atomic_directory``
does the same for a whole folder (``extract --format hf``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from unipack.errors import OutputExistsError, UnipackError


def check_writable(path: Path, *, force: bool) -> None:
    """Refuse early (before any heavy work) if ``path`` exists and ``force`` is not set."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; pass --force (force=True) to overwrite it")
    if path.exists() and path.is_dir():
        raise OutputExistsError(f"{path}: is a directory; give a file path")
    make_parent(path)


def make_parent(path: Path) -> Path:
    """The directory ``path`` goes in, created with its parents if missing (like ``mkdir -p``):
    every command that writes creates the folders its output needs."""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        return parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnipackError(f"{path}: cannot create directory {parent} ({exc.strerror or exc})") from None
    return parent


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
            raise UnipackError(
                f"{target}: write failed ({exc.strerror or exc}); the previous file, if any, is intact"
            ) from None
        raise
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, force: bool) -> Iterator[Path]:
    """Yield an empty temp directory beside ``path``; on clean exit it becomes ``path``.

    The temp directory is on the target's filesystem, so the final step is a rename: a reader
    sees no folder or a complete one. Every file written into it is fsynced before the rename.
    With ``force`` an existing directory is moved aside only once the new one is complete, then
    removed; between those two renames (microseconds) the path does not exist. On any failure
    the temp directory is removed and an existing directory is left (or put back) as it was.
    """
    target = Path(path)
    check_replaceable_dir(target, force=force)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise UnipackError(f"{target}: cannot create a temp directory in {parent} ({exc.strerror or exc})") from None
    aside: Path | None = None
    try:
        # mkdtemp creates 0700; the output should get the permissions a plain mkdir() would give.
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for entry in os.scandir(tmp):
            if entry.is_file(follow_symlinks=False):
                _fsync_path(Path(entry.path), os.O_RDONLY)
        _fsync_path(tmp, os.O_RDONLY)
        if os.path.lexists(target):
            if not force:  # appeared while we were writing
                raise OutputExistsError(f"{target}: appeared while writing; pass --force to replace it")
            check_replaceable_dir(target, force=force)
            aside = parent / f".{target.name}.{secrets.token_hex(4)}.old"
            os.rename(target, aside)
        os.rename(tmp, target)
    except BaseException as exc:
        if aside is not None and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.rename(aside, target)  # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UnipackError(
                f"{target}: write failed ({exc.strerror or exc}); nothing was written there "
                f"and the previous folder, if any, is intact"
            ) from None
        raise
    _fsync_dir(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def check_replaceable_dir(path: Path, *, force: bool) -> None:
    """Refuse early an output folder that exists (without ``force``) or must not be replaced.

    ``force`` replaces a whole folder, so it is limited to a plain, flat one: a symlink, a file,
    or a folder holding subfolders (a training run's checkpoints, a home directory) is refused.
    """
    make_parent(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a directory; give a new directory path")
    if not force:
        raise OutputExistsError(f"{path}: already exists; pass --force (force=True) to replace the folder")
    if contains(path, Path.cwd()):
        raise OutputExistsError(
            f"{path}: is the current directory or holds it; --force would replace it: give another directory"
        )
    try:
        nested = [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError as exc:
        raise UnipackError(f"{path}: cannot read the existing folder ({exc.strerror or exc})") from None
    if nested:
        raise OutputExistsError(
            f"{path}: holds subfolders ({', '.join(sorted(nested)[:3])}); --force replaces "
            f"only a flat model folder: remove it yourself or give another directory"
        )


def contains(directory: Path, path: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it (symlinks resolved)."""
    d, p = directory.resolve(), path.resolve()
    return d == p or d in p.parents


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        raise UnipackError(
            f"{directory / stem}: cannot create a scratch file in {directory} ({exc.strerror or exc})"
        ) from None
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
    except OSError as exc:
        raise UnipackError(
            f"{directory / stem}: write failed ({exc.strerror or exc}) while spooling "
            f"blobs; the previous file, if any, is intact"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def ensure_directory(directory: Path) -> Path:
    """``directory``, created with its parents if needed, for ``--all`` outputs; one-line errors."""
    if directory.exists() and not directory.is_dir():
        raise UnipackError(f"{directory}: exists and is not a directory; give a directory for --all")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnipackError(f"{directory}: cannot create directory ({exc.strerror or exc})") from None
    return directory
