"""Build (or load from cache) the demo population: real full fine-tunes of one tiny ViT.

Procedure: pretrain a base model on the train split, on digit identity under four views (plain,
rotated 180 degrees, mirrored, noisy) with a throwaway 40-way (view, digit) head; then fine-tune
one member per task from that base -- all weights trainable, a fresh randomly initialised head of
the task's size, AdamW with a small learning rate for a few epochs -- so members stay close to
the base yet genuinely differ, as real fine-tunes of one foundation model do.

Everything is seeded and training runs on one thread, so the same code gives the same weights
(one thread also keeps the build from stalling when other work shares the CPU). Results are
cached under ``cache_dir / f"population-{key}"``, where the key hashes the training plan, the
task list and ``POPULATION_VERSION``: any change to those trains a fresh population beside the
old one instead of trusting stale files. Each file is written under a temporary name and
renamed into place, and ``done.json`` (written last, with every file's SHA-256) marks the
population complete, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from unipack.demo.model import TinyViTConfig, TinyViTForImageClassification, build_model, count_parameters
from unipack.demo.tasks import DATA_SPEC, SMALL_TASK_NAMES, TASKS, Split, Task, require_sklearn

#: Bump when the training procedure changes in a way the plan below does not capture.
POPULATION_VERSION = 1

_DONE = "done.json"
# The pretrained model, kept for reference. Not a member, so it lives in a subfolder: a glob of
# the population folder for ``*.safetensors`` yields exactly the members.
_BASE_FILE = "base/pretrained.safetensors"
_PRETRAIN_CLASSES_PER_VIEW = 10

Log = Callable[[str], None]


@dataclass(frozen=True)
class Member:
    """One fine-tuned checkpoint of the population."""

    name: str
    path: Path
    task: Task


@dataclass(frozen=True)
class TrainingPlan:
    """Everything that determines the population's weights (hashed into the cache key)."""

    config: TinyViTConfig
    task_names: tuple[str, ...]
    pretrain_epochs: int
    pretrain_lr: float
    finetune_epochs: int
    finetune_lr: float  # body (all pretrained weights): small, to stay near the base
    head_lr: float  # the fresh head starts from scratch, so it may move faster
    # Pretraining sees every image under each of these tasks' views, labelled (view, digit).
    pretrain_task_names: tuple[str, ...] = ("identity", "rot180", "fliplr", "noisy")
    batch_size: int = 64
    weight_decay: float = 0.0  # no decay: it would pull every member towards zero, not the base
    seed: int = 0
    threads: int = 1

    def key(self) -> str:
        tasks = {task.name: task.spec() for task in TASKS}
        payload = {
            "version": POPULATION_VERSION,
            "plan": asdict(self),
            "tasks": [tasks[name] for name in self.task_names],
            "pretrain_tasks": [tasks[name] for name in self.pretrain_task_names],
            "data": DATA_SPEC,
            "torch": torch.__version__.split("+")[0],  # other kernels, other weights
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


FULL_PLAN = TrainingPlan(
    config=TinyViTConfig(),
    task_names=tuple(task.name for task in TASKS),
    pretrain_epochs=15,
    pretrain_lr=2e-3,
    finetune_epochs=6,
    finetune_lr=5e-4,
    head_lr=5e-3,
)

SMALL_PLAN = TrainingPlan(
    config=TinyViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    task_names=SMALL_TASK_NAMES,
    pretrain_epochs=6,
    pretrain_lr=3e-3,
    finetune_epochs=3,
    finetune_lr=1e-3,
    head_lr=1e-2,
)


def default_cache_dir() -> Path:
    """``$UNIPACK_CACHE`` if set, else ``~/.cache/unipack/demo``."""
    env = os.environ.get("UNIPACK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unipack" / "demo"


def build_population(cache_dir: Path, *, log: Log | None = None, small: bool = False) -> list[Member]:
    """Return the demo members, training them first unless a complete cached copy exists.

    ``small=True`` builds a much smaller, faster population (4 tasks, a 1-layer model) for tests.
    Raises ``ImportError`` (with the pip command) if scikit-learn is missing.
    """
    require_sklearn()
    say: Log = log or (lambda _msg: None)
    plan = SMALL_PLAN if small else FULL_PLAN
    tasks = _tasks_by_name(plan.task_names)
    directory = Path(cache_dir) / f"population-{plan.key()}"
    members = [Member(t.member_name, directory / f"{t.member_name}.safetensors", t) for t in tasks]

    if _cache_is_complete(directory, members):
        say(f"demo population: using cache {directory}")
        return members

    (directory / _BASE_FILE).parent.mkdir(parents=True, exist_ok=True)
    # Not complete any more while we rebuild, whatever an older marker says.
    (directory / _DONE).unlink(missing_ok=True)
    _train_population(plan, tasks, directory, say)
    return members


# --- cache ------------------------------------------------------------------------------------


def _tasks_by_name(names: tuple[str, ...]) -> list[Task]:
    by_name = {task.name: task for task in TASKS}
    return [by_name[name] for name in names]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_is_complete(directory: Path, members: list[Member]) -> bool:
    """True if ``done.json`` exists and every member file is there with its recorded checksum.

    Checksums cost milliseconds for these small files and catch a cache edited or damaged
    after the fact, which existence checks alone would trust.
    """
    try:
        done = json.loads((directory / _DONE).read_text())
        recorded: dict[str, str] = done["sha256"]
        return all(
            member.path.is_file() and recorded.get(member.path.name) == _sha256(member.path) for member in members
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp path beside ``target``, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _save_checkpoint(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # Own contiguous copies: safetensors refuses tensors that share storage.
    tensors = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _write_json(path: Path, payload: object) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    _atomic_write(path, write)


# --- training ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Train on ``count`` threads, restoring the caller's setting afterwards.

    For matrices this small a second thread gains little, and when another process shares the
    cores OpenMP's spinning threads can make an epoch ten times slower; a fixed count also keeps
    the floating-point reduction order (hence the weights) the same from machine to machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit(
    model: TinyViTForImageClassification,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    body_lr: float,
    head_lr: float,
    plan: TrainingPlan,
    seed: int,
) -> None:
    """AdamW with a cosine-decayed learning rate (settled final weights), shuffled mini-batches."""
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": body_lr}, {"params": head, "lr": head_lr}], weight_decay=plan.weight_decay
    )
    total = epochs * math.ceil(len(x) / plan.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), plan.batch_size):
            batch = order[start : start + plan.batch_size]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(dim=1) == y).float().mean())


def _pretrain_data(plan: TrainingPlan, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining mix: each view's images, labelled ``view_index * 10 + digit``."""
    xs, ys = [], []
    for index, task in enumerate(_tasks_by_name(plan.pretrain_task_names)):
        x, y = task.data(split)
        xs.append(x)
        ys.append(y + index * _PRETRAIN_CLASSES_PER_VIEW)
    return torch.cat(xs), torch.cat(ys)


def _train_population(plan: TrainingPlan, tasks: list[Task], directory: Path, say: Log) -> None:
    with _torch_threads(plan.threads):
        started = time.perf_counter()
        pretrain_labels = _PRETRAIN_CLASSES_PER_VIEW * len(plan.pretrain_task_names)
        torch.manual_seed(plan.seed)
        base = build_model(replace(plan.config, num_labels=pretrain_labels))
        say(
            f"demo population: training into {directory} "
            f"({count_parameters(base) - count_parameters(base.classifier):,} parameters before the head)"
        )
        x, y = _pretrain_data(plan, "train")
        _fit(
            base,
            x,
            y,
            epochs=plan.pretrain_epochs,
            body_lr=plan.pretrain_lr,
            head_lr=plan.pretrain_lr,
            plan=plan,
            seed=plan.seed,
        )
        base_acc = _accuracy(base, *_pretrain_data(plan, "test"))
        say(
            f"  base, pretrained on {pretrain_labels} (view, digit) classes: held-out accuracy {base_acc:.1f}%  "
            f"[{time.perf_counter() - started:.1f}s]"
        )
        _save_checkpoint(base, directory / _BASE_FILE, _base_metadata(plan, pretrain_labels, base_acc))
        base_state = {name: t.clone() for name, t in base.state_dict().items()}

        accuracies: dict[str, float] = {}
        for index, task in enumerate(tasks, start=1):
            t0 = time.perf_counter()
            seed = plan.seed + 1000 * index
            torch.manual_seed(seed)  # the fresh head's initialisation
            model = build_model(replace(plan.config, num_labels=pretrain_labels))
            model.load_state_dict(base_state)
            model.reset_classifier(task.num_labels)
            x, y = task.data("train")
            _fit(
                model,
                x,
                y,
                epochs=plan.finetune_epochs,
                body_lr=plan.finetune_lr,
                head_lr=plan.head_lr,
                plan=plan,
                seed=seed,
            )
            acc = _accuracy(model, *task.data("test"))
            accuracies[task.member_name] = acc
            _save_checkpoint(model, directory / f"{task.member_name}.safetensors", _member_metadata(task, plan, acc))
            say(
                f"  {task.member_name:<24} {task.num_labels:>2} classes  held-out accuracy {acc:5.1f}%  "
                f"(majority class {task.majority_rate():4.1f}%)  [{time.perf_counter() - t0:.1f}s]"
            )

    seconds = time.perf_counter() - started
    files = [_BASE_FILE] + [f"{task.member_name}.safetensors" for task in tasks]
    _write_json(
        directory / _DONE,
        {
            "population_version": POPULATION_VERSION,
            "key": plan.key(),
            "plan": asdict(plan),
            "base": _BASE_FILE,
            "base_accuracy": base_acc,
            "members": [task.member_name for task in tasks],
            "accuracy": accuracies,
            "sha256": {name: _sha256(directory / name) for name in files},
            "seconds": round(seconds, 2),
        },
    )
    say(f"demo population: built {len(tasks)} members in {seconds:.1f}s")


def _common_metadata(plan: TrainingPlan, num_labels: int, accuracy: float) -> dict[str, str]:
    return {
        "format": "pt",
        "model": "ViTForImageClassification (unipack demo tiny ViT)",
        "config": json.dumps(replace(plan.config, num_labels=num_labels).as_dict(), sort_keys=True),
        "num_labels": str(num_labels),
        "heldout_accuracy": f"{accuracy:.2f}",
        "unipack_demo_version": str(POPULATION_VERSION),
    }


def _base_metadata(plan: TrainingPlan, num_labels: int, accuracy: float) -> dict[str, str]:
    return _common_metadata(plan, num_labels, accuracy) | {
        "task": "pretrain",
        "description": "tiny ViT base pretrained on UCI digits, (view, digit) labels; its head is thrown away",
    }


def _member_metadata(task: Task, plan: TrainingPlan, accuracy: float) -> dict[str, str]:
    return _common_metadata(plan, task.num_labels, accuracy) | {
        "task": task.name,
        "member": task.member_name,
        "description": f"tiny ViT fully fine-tuned on UCI digits: {task.description}",
    }
