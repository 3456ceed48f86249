"""Input paths checked before they are opened, and weight files told apart by their content.

An input may be anything a path can name: a FIFO (opening it blocks until a writer comes, which
may be never), a device such as ``/dev/zero`` (endless bytes), a symlink loop, a dangling link.
Each is refused up front, saying what it is, so a merge never hangs on an open or reads forever.
Files unipack opens itself are opened with ``O_NONBLOCK`` and checked again with ``fstat``, so a
path swapped for a FIFO after the check still cannot block.

A weights file's kind is read from its first bytes, not trusted from its suffix: a safetensors
file saved as ``.bin`` is read as safetensors, and a PyTorch pickle named ``.safetensors`` is
named as such in the error.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from unipack.errors import InputError

#: File kinds (``stat.S_IFMT``) that are not regular files, and why each cannot be read as one.
_KINDS = {
    stat.S_IFDIR: ("a folder", ""),
    stat.S_IFIFO: ("a FIFO (named pipe)", ": reading it would wait for a writer, maybe forever"),
    stat.S_IFCHR: ("a character device", ": reading one (/dev/zero, a terminal) may never end"),
    stat.S_IFBLK: ("a block device", ""),
    stat.S_IFSOCK: ("a socket", ""),
}

#: First bytes of the weight file formats (see ``sniff``).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80


def describe(path: Path, what: str = "file") -> str | None:
    """Why ``path`` cannot be read as a regular ``what`` (a whole message after ``path: ``), or
    None if it is a regular file.

    Symlinks are followed (a Hugging Face cache links every file to its blob); a loop or a
    dangling link is named as such, not as a missing file.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return _stat_failure(path, exc)
    if stat.S_ISREG(mode):
        return None
    return _not_regular(mode, what)


def _not_regular(mode: int, what: str) -> str:
    kind, why = _KINDS.get(stat.S_IFMT(mode), ("a special file", ""))
    return f"is {kind}, not a regular file{why}; give the {what} as a regular file"


def _stat_failure(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link loop (it points, directly or not, at itself); fix or remove the link"
    if exc.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)!r}, which does not exist); fix or remove the link"
        return "no such file or folder"
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is too long for this system"
    return f"cannot read ({exc.strerror or exc})"


def exists(path: Path) -> bool:
    """Whether ``path`` names anything at all: a file of any kind, a folder, or a link (even a
    broken or looping one), so that a bad entry is reported rather than silently skipped."""
    return os.path.lexists(path)


def require_file(path: Path, what: str = "file") -> None:
    """Raise an InputError saying what ``path`` is unless it is a regular file (links followed)."""
    problem = describe(path, what)
    if problem is not None:
        raise InputError(f"{path}: {problem}")


def open_file(path: Path, what: str = "file") -> int:
    """A read-only descriptor of the regular file ``path``; never blocks (FIFOs are refused).

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the
    ``fstat`` that follows refuses whatever is not a regular file, so a path swapped after
    ``require_file`` is still caught. (On a regular file the flag changes nothing.)
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            raise InputError(
                f"{path}: cannot open: too many open files (this process may open {_fd_limit()}); "
                f"raise the limit with `ulimit -n`, or give fewer inputs"
            ) from None
        raise InputError(f"{path}: {_stat_failure(path, exc)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{path}: {_not_regular(mode, what)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_prefix(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of the regular file ``path`` (fewer if it is shorter)."""
    fd = open_file(path)
    try:
        return os.pread(fd, size, 0)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def sniff(path: Path) -> str | None:
    """``"safetensors"``, ``"torch"`` (a ``torch.save`` zip or legacy pickle), or None, from the
    file's first bytes: the suffix a file was given is no proof of what it holds."""
    head = read_prefix(path, 16)
    # safetensors first: a little-endian u64 header length, then the JSON header, an object. (Its
    # first byte may be 0x80, a pickle's first byte: a 128-byte header is common.)
    if len(head) >= 9 and 2 <= int.from_bytes(head[:8], "little") < 2**40 and head[8:].lstrip()[:1] == b"{":
        return "safetensors"
    if head.startswith(ZIP_MAGIC) or (len(head) >= 2 and head[0] == PICKLE_PROTO and 2 <= head[1] <= 5):
        return "torch"
    return None


def _fd_limit() -> str:
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return "unknown"
