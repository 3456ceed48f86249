"""Names a manifest may hold: member names become file names, config names are written into
folders, tensor names become keys of extracted files. Each is checked before it is used or written."""

from __future__ import annotations

import re

from unipack.errors import FormatError

MAX_NAME_CHARS = 255
MAX_TENSOR_NAME_CHARS = 1024
#: Largest config file kept verbatim per member (config.json and friends are a few KiB).
MAX_CONFIG_BYTES = 1024 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_member_name(name: object, where: str = "member name") -> str:
    """Member names become file names (``extract --all``): keep them inert."""
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: must be a non-empty string")
    if len(name) > MAX_NAME_CHARS:
        raise FormatError(f"{where}: {len(name)} characters (at most {MAX_NAME_CHARS})")
    if _CONTROL.search(name) or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise FormatError(f"{where} {name!r}: control characters, path separators and leading dots are not allowed")
    return name


def check_config_name(name: object, where: str = "config file name") -> str:
    """Config files are written back into a folder (``extract --format hf``): a plain ``*.json`` name."""
    if (
        not isinstance(name, str)
        or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}", name)
        or not name.endswith(".json")
    ):
        raise FormatError(f"{where}: {str(name)[:80]!r} is not a plain .json file name")
    return name


def check_tensor_name(name: object, where: str = "tensor name") -> str:
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: must be a non-empty string")
    if len(name) > MAX_TENSOR_NAME_CHARS or _CONTROL.search(name):
        raise FormatError(f"{where} {name[:80]!r}: too long or contains control characters")
    return name
