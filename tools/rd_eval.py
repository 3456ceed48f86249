"""Held-out accuracy of a member of the real MiniLM population (``tools/rd_population.py``).

``evaluate(state_dict, member_name)`` is the eval hook the rate-distortion benchmark hands to
unipack as ``tools/rd_eval.py:evaluate``: given only a member's (possibly reconstructed) tensors and
its name, it rebuilds ``BertForSequenceClassification`` from the member's ``config.json`` in the
cache, loads the tensors strictly and scores the member's task on its fixed test split.

Everything it needs is in the cache (``$UNIPACK_RD_CACHE`` or ``~/.cache/unipack/rd-minilm``): the
tokenizer in ``base/``, the test texts in ``tasks/``, the configs in ``population/``; so it works
from any working directory, loaded by file path, without the weights or data packages. It never
builds the population itself (that takes many minutes): run ``python tools/rd_population.py``
first, with the same ``$UNIPACK_RD_CACHE`` if the cache is not the default one.

Deterministic: fixed examples, fixed batches, eval mode, argmax. Per process the tokenized test set
and one model skeleton per member are kept, so a call costs one weight copy and one pass over the
test split (a few seconds on 2 cores).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Test examples per forward pass; sorted by length first, so a batch pads little.
_BATCH = 64
#: Threads for the forward passes; ``$UNIPACK_RD_THREADS`` overrides it (at most 2: the machine has 2).
_THREADS = max(1, min(2, int(os.environ.get("UNIPACK_RD_THREADS", "2"))))


def cache_dir() -> Path:
    """``$UNIPACK_RD_CACHE`` if set, else ``~/.cache/unipack/rd-minilm`` (as ``rd_population.py``)."""
    env = os.environ.get("UNIPACK_RD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unipack" / "rd-minilm"


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _member_dir(member_name: str) -> Path:
    root = cache_dir()
    index = root / "population.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"no MiniLM population in {root}: build it with `python tools/rd_population.py` "
            "(and point $UNIPACK_RD_CACHE at it if it lives elsewhere)"
        )
    folder = root / "population" / member_name
    if "/" in member_name or member_name.startswith(".") or not (folder / "config.json").is_file():
        known = sorted(m["name"] for m in _read_json(index)["members"])
        raise ValueError(f"unknown member {member_name!r}; the population has: {', '.join(known)}")
    return folder


# A NamedTuple, not a dataclass: dataclasses need the module in sys.modules, which a loader by
# file path (importlib's spec_from_file_location) may not arrange.
class _Setup(NamedTuple):
    model: torch.nn.Module  # a skeleton whose weights every call overwrites, strictly
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    count: int


# Keyed by (cache folder, member): a changed $UNIPACK_RD_CACHE never serves another cache's data.
_SETUPS: dict[tuple[str, str], _Setup] = {}
_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(root: Path) -> Any:
    key = str(root)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(root / "base")
    return _TOKENIZERS[key]


def _setup(member_name: str) -> _Setup:
    folder = _member_dir(member_name)
    root = folder.parent.parent
    key = (str(root), member_name)
    if key in _SETUPS:
        return _SETUPS[key]
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    info = _read_json(folder / "rd_member.json")
    task = _read_json(root / "tasks" / f"{info['task']}.json")
    config = BertConfig.from_pretrained(folder)
    if config.num_labels != len(task["labels"]):
        raise ValueError(
            f"{member_name}: config has {config.num_labels} labels, task {info['task']} has {len(task['labels'])}"
        )
    ids = _tokenizer(root)(task["test"]["text"], truncation=True, max_length=task["max_length"])["input_ids"]
    labels = task["test"]["label"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = []
    for start in range(0, len(order), _BATCH):
        chunk = order[start : start + _BATCH]
        width = max(len(ids[i]) for i in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)  # pad id 0, as in BERT's vocab
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            x[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        batches.append((x, mask, torch.tensor([labels[i] for i in chunk])))
    model = BertForSequenceClassification(config).eval()
    _SETUPS[key] = _Setup(model, batches, len(labels))
    return _SETUPS[key]


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(state_dict: Mapping[str, torch.Tensor], member_name: str) -> dict[str, float]:
    """``{"accuracy": percent}`` of these weights on ``member_name``'s held-out test split.

    Raises ``ValueError`` for an unknown member, and ``RuntimeError`` (from ``load_state_dict``)
    for tensors that miss, add to or do not fit the member's architecture.
    """
    setup = _setup(member_name)
    # Reconstructions may come back as fp16/bf16/fp64 or non-contiguous views: score in fp32.
    weights = {name: t.to(torch.float32) for name, t in state_dict.items()}
    setup.model.load_state_dict(weights, strict=True)
    correct = 0
    # Inference mode only around the forward passes: parameters created or written under it would
    # become inference tensors that a later load outside it could not overwrite.
    with _threads(_THREADS), torch.inference_mode():
        for x, mask, y in setup.batches:
            logits = setup.model(input_ids=x, attention_mask=mask).logits
            correct += int((logits.argmax(-1) == y).sum())
    return {"accuracy": 100.0 * correct / setup.count}


def load_original(member_name: str) -> dict[str, torch.Tensor]:
    """The member's fine-tuned tensors as built (float32), keyed as in its ``model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(_member_dir(member_name) / "model.safetensors")


def member_names() -> list[str]:
    """Names of the members built in the cache, in build order."""
    return [m["name"] for m in _read_json(cache_dir() / "population.json")["members"]]
