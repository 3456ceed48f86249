"""A built-in demo population: real fine-tunes of one tiny ViT on scikit-learn's bundled digits.

``build_population(cache_dir)`` pretrains a ~136k-parameter Vision Transformer (tensor names
exactly those of Hugging Face ``ViTForImageClassification``) on the UCI 8x8 handwritten digits
that ship with scikit-learn (no download), then fully fine-tunes one member per task -- digit
identity, parity, mod 3, closed loops, rotated/mirrored/noisy digits, ... -- each with its own
head size. The members are ``.safetensors`` files: a realistic, quick-to-build population to
pack with unipack, and ``evaluate(state_dict, member_name)`` scores any (e.g. reconstructed)
member's weights on its task's held-out split.

Training takes about two minutes on 2 CPU cores the first time; the result is cached under
``default_cache_dir()`` (``$UNIPACK_CACHE`` or ``~/.cache/unipack/demo``). Needs scikit-learn:
``pip install 'unipack[demo]'``.
"""

from __future__ import annotations

from unipack.demo.evaluate import accuracy_of, evaluate
from unipack.demo.population import POPULATION_VERSION, Member, build_population, default_cache_dir
from unipack.demo.tasks import TASKS, Task

__all__ = [
    "POPULATION_VERSION",
    "TASKS",
    "Member",
    "Task",
    "accuracy_of",
    "build_population",
    "default_cache_dir",
    "evaluate",
]
