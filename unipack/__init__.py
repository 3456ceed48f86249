"""unipack: store a collection of same-architecture checkpoints as one compact bundle.

Fine-tunes of one base model lie near a shared low-dimensional subspace per layer; unipack
stores a per-tensor mean, shared bases and small per-member coefficients, and reports how far
every member is from its original. The public API::

    import unipack
    result = unipack.merge(["a.safetensors", "b.safetensors"], "bundle.upk", max_error=0.01)
    unipack.add("bundle.upk", "c.safetensors")  # a later member, projected onto the bundle's bases
    with unipack.open("bundle.upk") as bundle:
        state_dict = bundle.load("a")          # dict[str, torch.Tensor]
        bundle.extract("a", "a.safetensors")  # same names, shapes, dtypes and metadata
        r = unipack.report(bundle)             # bytes, errors, baselines: what `unipack report` prints
"""

from __future__ import annotations

from unipack.analysis.report import Report, report
from unipack.api import Bundle, open
from unipack.errors import (
    ChecksumError,
    ClusterError,
    EvalError,
    FormatError,
    InputError,
    MemberNotFoundError,
    ModelError,
    OnnxCheckError,
    OptionsError,
    OutputExistsError,
    UnipackError,
)
from unipack.options import MergeOptions
from unipack.pack.add import AddResult, add
from unipack.pack.merge import MergeResult, merge
from unipack.usercode import load_eval
from unipack.version import __version__

__all__ = [
    "AddResult",
    "Bundle",
    "ChecksumError",
    "ClusterError",
    "EvalError",
    "FormatError",
    "InputError",
    "MemberNotFoundError",
    "MergeOptions",
    "MergeResult",
    "ModelError",
    "OnnxCheckError",
    "OptionsError",
    "OutputExistsError",
    "Report",
    "UnipackError",
    "__version__",
    "add",
    "load_eval",
    "merge",
    "open",
    "report",
]
