"""Inputs named by URL (``s3://bucket/ft1.safetensors``, ``gs://...``, ``file:///...``): told apart
from local paths here, without importing fsspec (``remote`` reads them, and imports it only then).

A string holding ``://`` is a URL; anything else (a ``Path``, a plain string) is a local path,
read as it always was. A ``Url`` keeps the text exactly as given, since ``Path`` would fold its
``//`` into one slash; it offers what the rest of unipack asks of an input's path: its text (in
messages), its last segment (``name``: member names and the manifest's ``source``), and a child
(``url / "config.json"``, for a model folder's files).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: What separates a URL's protocol from the rest.
URL_MARK = "://"


@dataclass(frozen=True)
class Url:
    """An input's URL, exactly as given (``s3://bucket/dir/ft1.safetensors``)."""

    text: str

    def __str__(self) -> str:
        return self.text

    @property
    def protocol(self) -> str:
        """``s3`` of ``s3://bucket/x`` (the last of a chained URL's, ``simplecache::s3://``)."""
        return self.text.split(URL_MARK, 1)[0].rsplit("::", 1)[-1]

    @property
    def name(self) -> str:
        """The last segment (a folder URL's trailing ``/`` ignored): what a local path's name is."""
        return self.text.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind(".") :] if "." in name.lstrip(".") else ""

    def __truediv__(self, child: str) -> Url:
        return Url(f"{self.text.rstrip('/')}/{child}")


#: Where an input is: a local path, or a URL that fsspec reads.
InputPath = Path | Url


def is_url(given: object) -> bool:
    """Whether ``given`` (an argument as the user typed it) names a URL, not a local path."""
    return isinstance(given, Url) or (isinstance(given, str) and URL_MARK in given)


def as_input(given: str | os.PathLike[str] | Url) -> InputPath:
    """``given`` as an input's location: a ``Url`` for a string holding ``://``, else a ``Path``."""
    if isinstance(given, Url):
        return given
    if isinstance(given, str) and URL_MARK in given:
        return Url(given)
    return Path(given)


def local_inputs(given: Iterable[str | os.PathLike[str] | Url]) -> list[str | os.PathLike[str]]:
    """The local paths among the inputs ``given``, with ``file://`` URLs as the paths they name:
    what an output must not overwrite (``format.atomic.check_not_input``)."""
    found: list[str | os.PathLike[str]] = []
    for item in given:
        text = item.text if isinstance(item, Url) else item
        if not isinstance(text, str) or URL_MARK not in text:
            found.append(text)
        elif text.startswith("file://"):
            found.append(text[len("file://") :])
    return found
