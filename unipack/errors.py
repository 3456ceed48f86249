"""The errors unipack raises on purpose.

Every failure a user can cause (bad input file, bad option, corrupt bundle) is a
``UnipackError``: the CLI turns it into one line on stderr and a non-zero exit, the Python
API lets it propagate. Anything else escaping is a bug in unipack.
"""

from __future__ import annotations


class UnipackError(Exception):
    """Base class: a problem with the user's input, options or files (not a unipack bug)."""


class FormatError(UnipackError):
    """A file is not what it claims to be: truncated, malformed, corrupt or of an unknown version."""


class ChecksumError(FormatError):
    """A blob's bytes do not match the checksum recorded for it."""


class InputError(UnipackError):
    """The checkpoints given to merge cannot be merged as they are (names, shapes, dtypes)."""


class OptionsError(UnipackError):
    """Options that are invalid or contradict each other."""


class ClusterError(UnipackError):
    """A Dask cluster (``merge --executor dask``) that cannot be reached, was lost, lost a worker,
    or whose workers run other versions than the merging process."""


class MemberNotFoundError(UnipackError):
    """A member name that the bundle does not hold."""


class OutputExistsError(UnipackError):
    """An output path exists and overwriting was not asked for."""


class EvalError(UnipackError):
    """A user's evaluation function could not be loaded, raised, or returned something unusable."""


class ModelError(UnipackError):
    """A member could not be built as a torch module or exported: no config and no ``--model``,
    a factory that raised or returned something unusable, a state dict that does not fit."""


class OnnxCheckError(ModelError):
    """An exported model's outputs differ from torch's by more than the tolerance.

    The file is kept (to inspect it); ``check`` holds every measured number so that the CLI can
    print them before the error line.
    """

    def __init__(self, message: str, check: object) -> None:
        super().__init__(message)
        self.check = check


def first_line(exc: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """An exception's first non-blank line, shortened to ``limit`` characters, for a one-line error.

    ``with_type`` prefixes the exception's class name (for errors from other libraries, whose
    messages often make sense only with it).
    """
    line = next((s.strip() for s in str(exc).splitlines() if s.strip()), "")
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    if with_type:
        return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line or "(no message)"
