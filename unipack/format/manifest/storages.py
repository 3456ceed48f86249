"""How a tensor record's scheme-specific fields are read: one ``StorageFormat`` per scheme.

The manifest parser knows the fields every record shares; for the rest it asks the format
registered here for the record's ``storage`` (and, where one storage has several schemes, for
the value of its discriminating field: ``scheme`` of ``shared``, ``form`` of ``lora``). Schemes
register themselves (``unipack.schemes.registry.register``), so the format layer never imports
a scheme; ``import unipack`` (which every import of a submodule runs first) registers them all.
"""

from __future__ import annotations

from typing import Protocol

from unipack.format.manifest.doc import Doc
from unipack.format.manifest.records import StorageParams, TensorRecord


class StorageFormat(Protocol):
    """The manifest side of a scheme."""

    name: str  # registry name, the params' ``scheme_name``
    storage: str  # the manifest's "storage" value
    variant: tuple[str, str] | None  # (field, value) telling this scheme from others of its storage
    shape_optional: bool  # the record's shape may be null (raw tensors whose shape varies)
    float_only: bool  # the record's dtype must be a float dtype
    min_format_version: int  # the format version that introduced it

    def parse_params(self, d: Doc, base: TensorRecord) -> StorageParams:
        """The scheme's params from its record (``base`` carries the common fields, validated)."""
        ...


#: name -> format, in registration order (which error messages list choices in).
STORAGE_FORMATS: dict[str, StorageFormat] = {}


def register_format(scheme: StorageFormat) -> None:
    if scheme.name in STORAGE_FORMATS:
        raise ValueError(f"storage scheme {scheme.name!r} registered twice")
    STORAGE_FORMATS[scheme.name] = scheme


def storages() -> tuple[str, ...]:
    """The ``storage`` values a manifest may use, in registration order."""
    return tuple(dict.fromkeys(s.storage for s in STORAGE_FORMATS.values()))


def formats_of(storage: str) -> list[StorageFormat]:
    return [s for s in STORAGE_FORMATS.values() if s.storage == storage]
