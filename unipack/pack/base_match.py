"""``merge --base``: which of the members' tensors the base model holds, and its reference.

Fine-tunes of a hub model always have their base at hand, so a bundle need not store the
members' mean where the base can stand in for it: a ``delta`` tensor is then each member's
quantized delta from the base's tensor, and the bundle records only the base tensor's name,
dtype, shape and sha256 (spec §11). This module matches the base's tensors to the members'
(by name, shape and dtype, across one common name prefix) and builds that reference.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from unipack.bundle.base_model import tensor_sha256
from unipack.errors import InputError
from unipack.format.manifest import BaseReference, BaseTensor, TensorRecord
from unipack.format.manifest.records import base_digest
from unipack.pack.plan import BaseTensorPlan, TensorPlan
from unipack.sources.checkpoint import Checkpoint, open_checkpoint, source_name


@dataclass(frozen=True)
class BaseMatch:
    """How the base's names map onto the members' (for the merge summary)."""

    source: str  # the base's file or folder name
    prefix: str  # the one prefix that tells the names apart ("" where they agree)
    members_prefixed: bool  # True: the members' names carry ``prefix``; False: the base's do
    matched: int  # tensors whose deltas may be taken from the base
    unmatched: tuple[str, ...]  # the members' decomposable tensors the base lacks (or holds otherwise)

    @property
    def text(self) -> str:
        """One line for the merge summary."""
        if not self.prefix:
            renamed = "same tensor names"
        elif self.members_prefixed:
            renamed = f"the members' names less the prefix {self.prefix!r}"
        else:
            renamed = f"the members' names with the prefix {self.prefix!r}"
        lacked = ""
        if self.unmatched:
            shown = ", ".join(self.unmatched[:3]) + (", ..." if len(self.unmatched) > 3 else "")
            lacked = f"; {len(self.unmatched)} it lacks (or holds otherwise) stay mean-centred ({shown})"
        return f"{self.source}: {self.matched} tensors matched ({renamed}){lacked}"


#: Bases opened in this process, by absolute path: a worker process opens the base once per merge.
_OPEN: dict[str, Checkpoint] = {}


def open_base(path: str | os.PathLike[str]) -> Checkpoint:
    """The base model at ``path`` (whatever a member may be: a .safetensors file, a model folder,
    a .bin), opened once per process; ``close_bases`` closes them."""
    key = os.path.abspath(path)
    if key not in _OPEN:
        if not Path(key).exists():
            raise InputError(
                f"{path}: --base: no such file or folder; give the base model the members were fine-tuned from"
            )
        base = open_checkpoint(Path(key), "base")
        if base.is_adapter:
            base.close()
            raise InputError(f"{path}: --base is a LoRA adapter; give the base model (a checkpoint or model folder)")
        _OPEN[key] = base
    return _OPEN[key]


def close_bases() -> None:
    for base in _OPEN.values():
        base.close()
    _OPEN.clear()


def base_tensor(plan: TensorPlan) -> tuple[np.ndarray, str] | None:
    """The base's tensor for ``plan`` (held array, dtype), or None where it was not matched."""
    if plan.base is None or plan.base.name is None:
        return None
    base = open_base(plan.base.path)
    return base.read(plan.base.name), base.tensors[plan.base.name].dtype


def match_base(
    base: Checkpoint, checkpoints: Sequence[Checkpoint], plans: list[TensorPlan]
) -> tuple[list[TensorPlan], BaseMatch]:
    """``plans`` with each decomposable tensor that the base holds at the same shape and dtype
    (in every member) pointed at its base tensor. Names match as they are, or across the one
    prefix (``bert.`` on the members' side or the base's) that matches most of them."""
    members = [p.name for p in plans]
    prefix, members_prefixed = _prefix(members, list(base.tensors))
    path = os.path.abspath(str(base.path))  # a local path: open_base opens no URL
    out, matched, unmatched = [], 0, []
    for plan in plans:
        if plan.storage != "shared" or plan.shape is None:
            out.append(replace(plan, base=BaseTensorPlan(path, None)))
            continue
        name = _base_name(plan.name, prefix, members_prefixed)
        info = base.tensors.get(name) if name is not None else None
        if name is None or info is None or tuple(info.shape) != plan.shape or any(d != info.dtype for d in plan.dtypes):
            unmatched.append(plan.name)
            out.append(replace(plan, base=BaseTensorPlan(path, None)))
            continue
        matched += 1
        out.append(replace(plan, base=BaseTensorPlan(path, name)))
    if matched == 0:
        raise InputError(
            f"{base.path}: --base holds none of the members' tensors at their shape and dtype (members: "
            f"{', '.join(members[:2])}; base: {', '.join(list(base.tensors)[:2])}); give their base model"
        )
    return out, BaseMatch(source_name(base.path), prefix, members_prefixed, matched, tuple(unmatched))


def _base_name(name: str, prefix: str, members_prefixed: bool) -> str | None:
    if not prefix:
        return name
    if members_prefixed:
        return name[len(prefix) :] if name.startswith(prefix) and len(name) > len(prefix) else None
    return prefix + name


def _prefix(members: list[str], base: list[str]) -> tuple[str, bool]:
    """The name mapping that matches the most names: the same names, or one prefix ending in a
    ``.`` dropped from the members' names (``bert.encoder...`` -> ``encoder...``) or added to
    them. Ties keep the same names."""
    base_set, member_set = set(base), set(members)
    counts: Counter[tuple[str, bool]] = Counter()
    for names, others, prefixed in ((members, base_set, True), (base, member_set, False)):
        for name in names:
            for i, ch in enumerate(name[:-1]):
                if ch == "." and name[i + 1 :] in others:
                    counts[name[: i + 1], prefixed] += 1
    same = len(member_set & base_set)
    if not counts:
        return "", True
    (prefix, prefixed), best = counts.most_common(1)[0]
    return (prefix, prefixed) if best > same else ("", True)


def base_reference(records: Sequence[TensorRecord], plans: Sequence[TensorPlan]) -> BaseReference | None:
    """The manifest's base table (spec §11.1) for the records centred on the base; None if none is
    (then the bundle is what it would have been without ``--base``, byte for byte)."""
    by_name = {p.name: p for p in plans}
    tensors: dict[str, BaseTensor] = {}
    source = ""
    for t in records:
        if not t.params.base_centred(t):
            continue
        plan = by_name[t.name]
        assert plan.base is not None and plan.base.name is not None
        base = open_base(plan.base.path)
        source = source_name(base.path)
        dtype = base.tensors[plan.base.name].dtype
        digest = tensor_sha256(base.read(plan.base.name), dtype)
        tensors[t.name] = BaseTensor(plan.base.name, dtype, tuple(base.tensors[plan.base.name].shape), digest)
    if not tensors:
        return None
    return BaseReference(source, base_digest(tensors), tensors)
