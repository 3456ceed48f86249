"""The .upk manifest: what a bundle holds and how to rebuild every member.

- ``records``: the typed records (blobs, tensors, members, the manifest itself);
- ``names``: the checks on names a manifest holds (members, tensors, config files);
- ``doc``: typed, located access to the JSON;
- ``storages``: the registry through which each scheme reads its own record fields;
- ``parse``: JSON both ways (``to_json``, ``from_json``), ``references``: the rules between records.
"""

from unipack.format.manifest.names import (
    MAX_CONFIG_BYTES,
    MAX_NAME_CHARS,
    MAX_TENSOR_NAME_CHARS,
    check_config_name,
    check_member_name,
    check_tensor_name,
)
from unipack.format.manifest.parse import from_json, to_json
from unipack.format.manifest.records import (
    BASE_REF_FORMAT_VERSION,
    CHUNKED_CODEC,
    CHUNKED_FORMAT_VERSION,
    COMPRESSED_MANIFEST_VERSION,
    DELTA_FORMAT_VERSION,
    EXACT_TIER_FORMAT_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    LORA_FORMAT_VERSION,
    LORA_OVERRIDE_FORMAT_VERSION,
    LORA_QUANT_FORMAT_VERSION,
    MANIFEST_BLOB,
    MEMBER_NUMBERS_FORMAT_VERSION,
    NUMBERS_BLOB,
    SUPPORTED_VERSIONS,
    BaseReference,
    BaseTensor,
    BlobRecord,
    BlobRef,
    DeferredNumbers,
    ExactEntry,
    FidelityRecord,
    Manifest,
    MemberNumbers,
    MemberRecord,
    NumbersSection,
    StorageParams,
    TensorRecord,
    code_runs,
)

__all__ = [
    "BASE_REF_FORMAT_VERSION",
    "CHUNKED_CODEC",
    "CHUNKED_FORMAT_VERSION",
    "COMPRESSED_MANIFEST_VERSION",
    "MANIFEST_BLOB",
    "MEMBER_NUMBERS_FORMAT_VERSION",
    "NUMBERS_BLOB",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DELTA_FORMAT_VERSION",
    "EXACT_TIER_FORMAT_VERSION",
    "LORA_FORMAT_VERSION",
    "LORA_OVERRIDE_FORMAT_VERSION",
    "LORA_QUANT_FORMAT_VERSION",
    "MAX_CONFIG_BYTES",
    "MAX_NAME_CHARS",
    "MAX_TENSOR_NAME_CHARS",
    "SUPPORTED_VERSIONS",
    "BaseReference",
    "BaseTensor",
    "BlobRecord",
    "BlobRef",
    "DeferredNumbers",
    "ExactEntry",
    "FidelityRecord",
    "Manifest",
    "MemberNumbers",
    "MemberRecord",
    "NumbersSection",
    "StorageParams",
    "TensorRecord",
    "check_config_name",
    "check_member_name",
    "check_tensor_name",
    "code_runs",
    "from_json",
    "to_json",
]
