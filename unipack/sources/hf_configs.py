"""The small config files of a Hugging Face model folder, kept verbatim with the member.

They are what turns a bundle member back into a loadable model folder (architecture, labels,
preprocessing), so they are stored as their exact text, not re-serialised: a reader gets the
file the user had, key order, formatting and all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from unipack.errors import InputError
from unipack.format.manifest import MAX_CONFIG_BYTES
from unipack.sources.files import exists, open_file
from unipack.sources.url import InputPath

#: The files kept, when present: the model's, generation's and preprocessor's configuration.
CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")


def read_configs(folder: Path) -> dict[str, str] | None:
    """``{file name: exact text}`` of the folder's config files, or None if it has none."""
    found = {}
    for name in CONFIG_FILES:
        path = folder / name
        if exists(path):  # a FIFO or broken link in its place is refused (read_config), not skipped
            found[name] = read_config(path)
    return found or None


def read_config(path: Path) -> str:
    """One config file's text: at most ``MAX_CONFIG_BYTES``, UTF-8, valid JSON."""
    fd = open_file(path, "config file")  # a regular file, or an InputError saying what it is
    with open(fd, "rb") as f:  # owns fd from here
        try:
            size = os.fstat(fd).st_size
            # The file may grow after fstat: never read more than the limit and one byte.
            data = f.read(MAX_CONFIG_BYTES + 1) if size <= MAX_CONFIG_BYTES else b""
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return config_text(path, data, size)


def config_text(path: InputPath, data: bytes, size: int) -> str:
    """The text of the config file ``path`` of ``size`` bytes, whose first bytes (up to
    ``MAX_CONFIG_BYTES + 1``) are ``data``: checked as ``read_config`` checks it."""
    if size > MAX_CONFIG_BYTES:
        raise _too_big(path, size)
    if len(data) > MAX_CONFIG_BYTES:
        raise _too_big(path, len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); save it as UTF-8 JSON"
        ) from None
    try:
        json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); fix it or remove it from the folder") from None
    return text


def _too_big(path: InputPath, size: int) -> InputError:
    return InputError(
        f"{path}: {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit for a config file kept "
        f"in the bundle; shrink it or remove it from the folder"
    )
