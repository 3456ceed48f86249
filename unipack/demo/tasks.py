"""The demo's tasks: distinct labelings and views of scikit-learn's bundled UCI handwritten digits.

All tasks share ONE fixed, stratified 80/20 train/held-out split of the 1797 8x8 images, so a
member's held-out accuracy is always measured on images no member (nor the base) trained on.
A task is pure data (a digit -> label table and the name of an image view), which keeps it
hashable, printable and usable in the population's cache key.

scikit-learn is imported only when data is first needed, so ``import unipack.demo`` works
without it and the error says how to install it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Split = Literal["train", "test"]
View = Literal["plain", "rot180", "fliplr", "noisy"]

#: Member files are named ``f"{MEMBER_PREFIX}{task.name}"``.
MEMBER_PREFIX = "vit-digits-"

_SPLIT_SEED = 0  # the one train/held-out split every task uses
_HELD_OUT_FRACTION = 0.2
_NOISE_STD = 0.2  # pixel noise for the "noisy" view, on the [0, 1] scale
_NOISE_SEEDS: dict[str, int] = {"train": 1, "test": 2}  # fixed noise, different per split

#: What fixes the data every task draws from (part of the population's cache key).
DATA_SPEC: dict[str, object] = {
    "source": "sklearn.datasets.load_digits",
    "split_seed": _SPLIT_SEED,
    "held_out_fraction": _HELD_OUT_FRACTION,
    "stratified": True,
    "noise_std": _NOISE_STD,
    "noise_seeds": _NOISE_SEEDS,
}

INSTALL_HINT = "the unipack demo needs scikit-learn: pip install 'unipack[demo]'"


@dataclass(frozen=True)
class Task:
    """One classification task over the digits.

    ``label_of_digit[d]`` is the class of an image of digit ``d``, or -1 to leave such images
    out of the task altogether (restricted subsets). ``view`` is how images are shown.
    """

    name: str
    num_labels: int
    description: str
    label_of_digit: tuple[int, ...]
    view: View = "plain"

    def __post_init__(self) -> None:
        if len(self.label_of_digit) != 10:
            raise ValueError(f"task {self.name}: label_of_digit needs 10 entries")
        used = sorted({label for label in self.label_of_digit if label >= 0})
        if used != list(range(self.num_labels)):
            raise ValueError(f"task {self.name}: labels {used} are not 0..{self.num_labels - 1}")

    @property
    def member_name(self) -> str:
        """The stem of this task's member file, e.g. ``vit-digits-parity``."""
        return MEMBER_PREFIX + self.name

    def data(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, y)`` for ``split``: X float32 (n, 1, 8, 8) in [0, 1], y int64 (n,)."""
        images, digits = _split_arrays(split)
        table = np.asarray(self.label_of_digit, dtype=np.int64)
        labels = table[digits]
        keep = labels >= 0
        x = _apply_view(images[keep], self.view, split)
        return torch.from_numpy(x), torch.from_numpy(labels[keep])

    def majority_rate(self, split: Split = "test") -> float:
        """Accuracy (percent) of always predicting the most common class: the chance baseline."""
        _, y = self.data(split)
        return 100.0 * float(torch.bincount(y).max()) / len(y)

    def spec(self) -> dict[str, object]:
        """A JSON-able description, used in the population's cache key and metadata."""
        return {
            "name": self.name,
            "num_labels": self.num_labels,
            "description": self.description,
            "label_of_digit": list(self.label_of_digit),
            "view": self.view,
        }


def _table(mapping: dict[int, int]) -> tuple[int, ...]:
    return tuple(mapping.get(d, -1) for d in range(10))


_IDENTITY = tuple(range(10))
_PRIMES = {2, 3, 5, 7}
# Closed loops as printed: 0, 4 (closed top), 6, 9 have one; 8 has two; the rest none.
_LOOPS = {0: 1, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 1, 7: 0, 8: 2, 9: 1}

TASKS: tuple[Task, ...] = (
    Task("identity", 10, "which digit (0-9)", _IDENTITY),
    Task("parity", 2, "is the digit odd", tuple(d % 2 for d in range(10))),
    Task("mod3", 3, "digit modulo 3", tuple(d % 3 for d in range(10))),
    Task("lt5", 2, "is the digit 5 or more", tuple(int(d >= 5) for d in range(10))),
    Task("prime", 2, "is the digit prime", tuple(int(d in _PRIMES) for d in range(10))),
    Task("loops", 3, "number of closed loops (0, 1 or 2)", _table(_LOOPS)),
    Task("low5", 5, "which digit, on images of 0-4 only", _table({d: d for d in range(5)})),
    Task("rot180", 10, "which digit, image rotated 180 degrees", _IDENTITY, "rot180"),
    Task("fliplr", 10, "which digit, image mirrored left-right", _IDENTITY, "fliplr"),
    Task("noisy", 10, f"which digit, with Gaussian pixel noise (std {_NOISE_STD})", _IDENTITY, "noisy"),
    Task("one-vs-seven", 2, "1 or 7, on images of those two only", _table({1: 0, 7: 1})),
    Task("mod4", 4, "digit modulo 4", tuple(d % 4 for d in range(10))),
)

#: Tasks of the ``small=True`` population: few, but with distinct class counts (10, 2, 3, 5).
SMALL_TASK_NAMES: tuple[str, ...] = ("identity", "parity", "mod3", "low5")


def task_for_member(member_name: str) -> Task:
    """The task behind a member name (``vit-digits-parity``; the bare ``parity`` works too).

    Raises ``ValueError`` naming the known members if there is none.
    """
    for task in TASKS:
        if member_name in (task.member_name, task.name):
            return task
    known = ", ".join(task.member_name for task in TASKS)
    raise ValueError(f"unknown demo member {member_name!r}; known members: {known}")


# --- data -------------------------------------------------------------------------------------


def require_sklearn() -> None:
    """Raise a clear ``ImportError`` if scikit-learn (the source of the digits) is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


@functools.lru_cache(maxsize=1)
def _split_all() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    require_sklearn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # bundled with scikit-learn: no download
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # (n, 1, 8, 8) in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        digits.target.astype(np.int64),
        test_size=_HELD_OUT_FRACTION,
        random_state=_SPLIT_SEED,
        stratify=digits.target,
    )
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def _split_arrays(split: Split) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return _split_all()[split]


def _apply_view(images: np.ndarray, view: View, split: Split) -> np.ndarray:
    # Copies throughout: the cached split arrays must never be modified in place.
    if view == "plain":
        return images.copy()
    if view == "rot180":
        return np.ascontiguousarray(images[:, :, ::-1, ::-1])
    if view == "fliplr":
        return np.ascontiguousarray(images[:, :, :, ::-1])
    if view == "noisy":
        # Fixed noise per split (seeded), so held-out accuracy is reproducible.
        rng = np.random.default_rng(_NOISE_SEEDS[split])
        noise = rng.normal(0.0, _NOISE_STD, size=images.shape).astype(np.float32)
        return np.clip(images + noise, 0.0, 1.0)
    raise ValueError(f"unknown view {view!r}")
