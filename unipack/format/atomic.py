"""Atomic file output: write a temp file beside the target, fsync it, rename it into place.

A reader never sees a half-written file, an interrupted write leaves the old file untouched,
and a failure (disk full, Ctrl-C, SIGTERM, an exception) removes the temp file.
``atomic_directory`` does the same for a whole folder (``extract --format hf``).

Temp and spool files are named ``.<target name>.unipack_<8 random characters>.tmp`` (``.spool``),
the target's name shortened where needed so that the whole name fits in one file name, and
their writer holds an ``flock`` on them for as long as it lives. A writer killed outright
(SIGKILL, a power cut) cannot remove its file; the next write to the same target removes every
such file that nobody holds locked (the kernel drops a process's locks when it dies, however it
dies), so leftovers do not pile up and a live writer's file is never touched.

``bundle_lock`` serializes the writers of one bundle; see its docstring.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from unipack.errors import FormatError, OutputExistsError, UnipackError

logger = logging.getLogger(__name__)

#: The largest file name, in bytes, on the usual file systems (ext4, xfs, btrfs, tmpfs, APFS).
NAME_MAX = 255
#: What ``extract`` appends to a member's name to name its file.
MEMBER_FILE_SUFFIX = ".safetensors"
#: Marks our temp and spool files: the stale-file cleanup removes only names of exactly our
#: shape, never another program's ``.<name>.<random>.tmp``.
TEMP_MARK = "unipack_"
#: mkstemp's random part (8 characters of ``[a-z0-9_]``) and our suffixes.
_TEMP_TAIL = re.compile(r"[a-z0-9_]{8}\.(?:tmp|spool)")
#: Bytes a temp name adds to the (shortened) target name: two dots, the mark, the random part
#: and the longest suffix (".spool"; ".tmp" and ".old" are shorter).
_TEMP_OVERHEAD = 2 + len(TEMP_MARK) + 8 + len(".spool")
#: flock errors that mean "this file system has no locks" rather than a failure.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def check_writable(path: Path, *, force: bool, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Refuse early (before any heavy work) if ``path`` exists and ``force`` is not set, or if it
    would replace one of ``inputs``, the files the command reads."""
    check_not_input(path, inputs)
    exists = True
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the folder is checked below)
        exists = False
    except OSError as exc:  # a name too long, a loop of links: no file can be written there
        raise UnipackError(f"{path}: cannot write there ({exc.strerror or exc}); give another output path") from None
    if exists and not force:
        raise OutputExistsError(f"{path}: already exists; pass --force (force=True) to overwrite it")
    if exists and os.path.isdir(path):
        raise OutputExistsError(f"{path}: is a directory; give a file path")
    make_parent(path)


def check_not_input(path: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output that would replace what the command reads: one of ``inputs`` under any
    spelling (a symbolic or hard link, ``./x``), or an existing file inside an input folder.

    The write itself would succeed, which is the danger: ``extract B -m x -o B --force`` would
    leave a one-member checkpoint where the whole bundle was.
    """
    for given in inputs:
        source = Path(given)
        if same_file(path, source):
            where = "is an input" if str(path) == str(source) else f"is {source}, an input"
        elif os.path.isdir(source) and os.path.exists(path) and contains(source, path):
            where = f"is inside {source}, an input"
        else:
            continue
        raise OutputExistsError(
            f"{path}: {where} of this command; writing the output there would destroy it: give another output path"
        )


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` are one file (or, where one does not exist, one path once resolved)."""
    try:
        return os.path.samefile(a, b)  # links, hard links, any spelling of one file
    except OSError:  # one of them does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def make_parent(path: Path) -> Path:
    """The directory ``path`` goes in, created with its parents if missing (like ``mkdir -p``):
    every command that writes creates the folders its output needs."""
    parent = path.parent if str(path.parent) else Path(".")
    if os.path.isdir(parent):
        return parent
    _refuse_file_in_the_way(path, parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnipackError(f"{path}: cannot create directory {parent} ({exc.strerror or exc})") from None
    return parent


def _refuse_file_in_the_way(path: Path, directory: Path) -> None:
    """``directory`` or one of its parents exists but is not a folder: say which, not the
    ``File exists`` / ``Not a directory`` that mkdir would."""
    for ancestor in (directory, *directory.parents):
        if os.path.lexists(ancestor):
            if os.path.isdir(ancestor):
                return
            what = "a broken link" if os.path.islink(ancestor) and not os.path.exists(ancestor) else "a file"
            raise UnipackError(
                f"{path}: cannot create directory {directory}: {ancestor} is {what}, not a folder; "
                f"give an output path in a folder"
            )


def real_target(path: Path) -> Path:
    """Where writing ``path`` really goes: a symbolic link at ``path`` is followed (links to links
    too), so the file it names is replaced and the link stays a link, as with a plain ``open``."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def check_member_file_name(name: str) -> str:
    """A new member's name must come back out as ``<name>.safetensors`` (``extract``, ``--all``):
    that is one file name, so at most ``NAME_MAX`` bytes with the suffix. Temp names are
    shortened (``temp_prefix``) and do not count; a bundle read from elsewhere is not held to
    this (its member can still be extracted with ``-o``), only names a merge or add gives."""
    size = len((name + MEMBER_FILE_SUFFIX).encode("utf-8", "surrogateescape"))
    if size > NAME_MAX:
        shown = repr(name) if len(name) <= 40 else f"{name[:40]!r}..."
        raise FormatError(
            f"member name {shown} is {size - len(MEMBER_FILE_SUFFIX)} bytes: extracted as "
            f"<name>{MEMBER_FILE_SUFFIX} it would not fit in a file name ({NAME_MAX} bytes); at most "
            f"{NAME_MAX - len(MEMBER_FILE_SUFFIX)} bytes"
        )
    return name


def temp_prefix(target: Path) -> str:
    """``.<name>.unipack_``, the prefix of ``target``'s temp, spool and set-aside names.

    The name is cut so that prefix, random part and suffix fit in one file name: a target name
    of 250 bytes is legal, and the write must not fail on its temp name.
    """
    room = _name_max(target.parent) - _TEMP_OVERHEAD
    name = target.name
    while len(name.encode("utf-8", "surrogateescape")) > room:
        name = name[:-1]
    return f".{name}.{TEMP_MARK}"


def _name_max(directory: Path) -> int:
    try:
        return min(os.pathconf(directory if str(directory) else ".", "PC_NAME_MAX"), NAME_MAX)
    except (OSError, ValueError):
        return NAME_MAX


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove temp and spool files that earlier writes to ``target`` left behind when killed.

    The rule: a file is removed only if (1) its name has exactly our shape for this target
    (``temp_prefix(target)`` + 8 random characters + ``.tmp``/``.spool``), (2) it is a regular
    file, and (3) an exclusive ``flock`` on it is granted without waiting. Every writer holds that
    lock on its file from creating it until it is renamed or removed, and the kernel releases it
    when the writer dies, SIGKILL included: a granted lock means no live process owns the file.
    No clock or pid is trusted (a pid can be reused, and another machine's pids mean nothing on a
    shared file system). Where locks are unsupported the lock is never granted and nothing is
    removed. Returns the files removed (logged at INFO).
    """
    prefix = temp_prefix(target)
    directory = target.parent if str(target.parent) else Path(".")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed  # an unreadable folder: the write itself will say so
    for entry in entries:
        if not entry.name.startswith(prefix) or not _TEMP_TAIL.fullmatch(entry.name[len(prefix) :]):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and _unlink_if_unheld(Path(entry.path)):
                removed.append(Path(entry.path))
    if removed:
        logger.info("%s: removed %d stale temp file(s) of killed writes: %s", target, len(removed), removed)
    return removed


def _unlink_if_unheld(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it, or this file system has no locks: keep it
        # The name must still be the file we locked (not replaced between scandir and open).
        held, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _fresh_temp(target: Path, suffix: str, shown: Path, what: str) -> tuple[int, Path]:
    """``_create_temp`` after clearing a killed writer's leftovers for ``target``; an OS error is
    one ``UnipackError`` line naming ``shown`` (the path the user gave)."""
    remove_stale_temps(target)
    try:
        return _create_temp(target, suffix)
    except OSError as exc:
        raise UnipackError(
            f"{shown}: cannot create {what} in {target.parent} ({exc.strerror or exc}); "
            f"give an output path in a folder you can write to"
        ) from None


def _create_temp(target: Path, suffix: str) -> tuple[int, Path]:
    """A new temp file beside ``target``, locked by this process for its whole life.

    A cleanup run by another write to the same target can take the lock in the instant between
    mkstemp creating the file and our locking it, and remove the file; we then hold a lock on a
    removed file (no links left), so we take another name.
    """
    directory = target.parent if str(target.parent) else Path(".")
    for _ in range(16):
        fd, name = tempfile.mkstemp(prefix=temp_prefix(target), suffix=suffix, dir=directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                return fd, Path(name)  # no locks here: the cleanup cannot take one either, so it keeps it
            _discard(fd, name)
            raise
        except BaseException:
            _discard(fd, name)
            raise
        if os.fstat(fd).st_nlink > 0:
            return fd, Path(name)
        os.close(fd)
    raise OSError(errno.EAGAIN, "every temp file created was removed at once by another process")


def _discard(fd: int, name: str) -> None:
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], *, force: bool, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it replaces ``path`` atomically, otherwise it is removed.

    A symbolic link at ``path`` is followed: the file it names is replaced (the temp file is made
    beside that file, so the rename stays on one file system) and the link stays a link.
    ``inputs`` are the files the command reads; replacing one of them is refused. Every OS error
    (no such folder, read-only, name too long, disk full) is one ``UnipackError`` line.
    """
    shown = Path(path)
    check_writable(shown, force=force, inputs=inputs)
    target = real_target(shown)
    fd, tmp = _fresh_temp(target, ".tmp", shown, "a file")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates 0600; the output should get the permissions a plain open() would give.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
            if os.path.exists(target) and not force:  # appeared while we were writing
                raise OutputExistsError(f"{shown}: appeared while writing; pass --force to overwrite it")
            # Renamed while still open, hence still locked: no cleanup can mistake it for a
            # dead writer's leftover between the last write and the rename.
            os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise UnipackError(
                f"{shown}: write failed ({exc.strerror or exc}); the previous file, if any, is intact"
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
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=parent))
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
            aside = parent / f"{temp_prefix(target)}{secrets.token_hex(4)}.old"
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
    the common failure, and it is reported like any failed write. Named and locked like a temp
    file (``.<stem>.unipack_*.spool``), so a killed writer's spool is cleaned up like one.
    """
    target = directory / stem
    fd, name = _fresh_temp(target, ".spool", target, "a scratch file")
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
    except OSError as exc:
        raise UnipackError(
            f"{target}: write failed ({exc.strerror or exc}) while spooling blobs; the previous file, if any, is intact"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def ensure_directory(directory: Path) -> Path:
    """``directory``, created with its parents if needed, for ``--all`` outputs; one-line errors."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UnipackError(f"{directory}: exists and is not a directory; give a directory for --all")
    _refuse_file_in_the_way(directory, directory.parent)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnipackError(f"{directory}: cannot create directory ({exc.strerror or exc})") from None
    return directory


# -- the writers' lock of a bundle ---------------------------------------------------------------


@dataclass
class _Hold:
    """A lock this thread holds: its descriptor (None where locks are unsupported), how deep."""

    fd: int | None
    depth: int = 1


#: The locks this thread holds, by lock file path (``bundle_lock`` is re-entrant per thread;
#: another thread of this process opens the file again and waits on its own ``flock``).
_held = threading.local()


def lock_path_of(bundle: str | os.PathLike[str]) -> Path:
    """``<bundle>.lock`` beside the bundle (a link at ``bundle`` followed first); a name too long
    for ``.lock`` is shortened, and two bundles sharing such a prefix then share a lock, which
    only serializes them more."""
    real = real_target(Path(bundle))
    name = real.name
    while len((name + ".lock").encode("utf-8", "surrogateescape")) > _name_max(real.parent):
        name = name[:-1]
    return real.with_name(name + ".lock")


@contextlib.contextmanager
def bundle_lock(bundle: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the writers' lock of ``bundle``: an exclusive ``flock`` on ``<bundle>.lock`` beside it.

    ``add`` holds it from reading the old bundle until its new one is renamed into place, and
    every bundle write (``merge --force`` onto an existing bundle included) holds it for its
    final write and rename. So two writers never both build on one old bundle (one member would
    be lost), and nothing is renamed over a bundle between an ``add``'s read and its rename.
    Readers take no lock: a bundle is never changed in place, only replaced by a rename, and a
    reader reads everything through the one descriptor it opened, so it sees one whole file.
    Waiting is unbounded (an ``add`` waits for the one before it); Ctrl-C or SIGTERM ends a wait.

    The lock file is removed only by the process that holds it, as the last step while it still
    holds it; a process that was waiting then gets the lock on a removed file, sees that the path
    no longer names the file it locked, and starts over on the current one. So folders do not
    collect ``.lock`` files, yet two writers never hold the lock at once (removing the file after
    releasing it, or by anyone else, would allow that: a waiter would hold the lock on the removed
    file while a newcomer locked a new one). A writer killed outright leaves the file behind; it
    is harmless, and the next writer uses and removes it. Re-entrant within a thread: ``add``
    holds it when ``rewrite_bundle`` and ``BundleWriter.finish`` ask for it again. Where the file
    system has no locks (some network mounts), the write goes ahead unlocked, as before locking
    existed, with a warning in the log.
    """
    lock_path = lock_path_of(bundle)
    held: dict[str, _Hold] = _held.__dict__.setdefault("locks", {})
    key = str(lock_path)
    hold = held.get(key)
    if hold is not None:
        hold.depth += 1
    else:
        hold = held[key] = _Hold(_acquire(lock_path, Path(bundle)))
    try:
        yield
    finally:
        hold.depth -= 1
        if hold.depth == 0:
            del held[key]
            if hold.fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)  # while still holding it: see the docstring
                os.close(hold.fd)


def _acquire(lock_path: Path, bundle: Path) -> int | None:
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise UnipackError(
                f"{bundle}: cannot open its lock file {lock_path} ({exc.strerror or exc}); "
                f"writing the bundle needs a folder you can write to"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits; a signal handler's exception ends the wait
            locked = os.fstat(fd)
            try:
                now: os.stat_result | None = os.stat(lock_path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                logger.warning("%s: file locks are not supported here; writing without the lock", lock_path)
                return None
            raise UnipackError(f"{bundle}: cannot lock {lock_path} ({exc.strerror or exc})") from None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
            return fd
        os.close(fd)  # we locked a file its holder had removed: start over on the current one
