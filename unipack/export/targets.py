"""Checks shared by the exporters that write a folder (Hugging Face, PEFT)."""

from __future__ import annotations

from pathlib import Path

from unipack.bundle.reader import BundleReader
from unipack.errors import OutputExistsError
from unipack.format.atomic import check_replaceable_dir, contains


def check_folder_target(bundle: BundleReader, target: Path, *, force: bool) -> None:
    """Refuse a target that is the bundle or holds it (``--force`` would delete what we read)."""
    if contains(target, bundle.path):
        raise OutputExistsError(f"{target}: is or holds the bundle {bundle.path}; give another directory")
    check_replaceable_dir(target, force=force)
