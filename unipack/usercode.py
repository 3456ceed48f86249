"""The user's evaluation hook: ``--eval SPEC`` loaded, called and its results checked.

``unipack report --eval SPEC`` and ``unipack merge --eval SPEC`` score every member twice, once
with its original weights and once with the weights rebuilt from the bundle, so that fidelity
is also stated in the user's own terms (accuracy, perplexity, ...), not only as relative error.

SPEC names a function ``evaluate(state_dict, member_name) -> dict[str, float]``:

* ``path/to/eval.py`` or ``path/to/eval.py:score``: a Python file (function ``evaluate`` unless
  named after the last ``:``). The text before the last ``:`` is a path when it ends in ``.py``
  or is an existing file.
* ``package.module`` or ``package.module:score``: an importable module, e.g.
  ``unipack.demo.evaluate:evaluate``.

Metric convention: **higher is better**, and a metric's *drop* is ``original - reconstructed``
(positive means the bundle lost something). A metric where lower is better (a loss, perplexity)
should be returned negated.

``unipack export --model SPEC`` (unipack.export.torch_module) loads its model factory with the same
``load_function``; only the option named in its errors and its default function differ.

Safety: this is the one place unipack runs code it did not ship, and only code the user named
on the command line or passed to the API. Nothing read from a bundle or a checkpoint ever
reaches ``load_eval`` (tests/test_no_code_execution.py allows ``importlib.import_module`` here
and nowhere else).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from unipack.errors import EvalError, UnipackError, first_line

if TYPE_CHECKING:
    import torch

DEFAULT_FUNCTION = "evaluate"
#: Longest user-supplied text (an exception message, a repr) quoted in an error line.
_QUOTE_LIMIT = 200

EvalFunction = Callable[[Mapping[str, "torch.Tensor"], str], Any]


@dataclass(frozen=True)
class HookKind:
    """Which option a SPEC came from, so that loading errors name that option and its defaults.

    ``--eval`` and ``--model`` (unipack.export.torch_module) load user functions the same way; only the
    words in their error lines, their default function name and their error class differ.
    """

    option: str  # "eval": errors read "eval SPEC: ..."
    default_function: str  # the function a SPEC without ":function" names
    example: str  # how a file SPEC looks, e.g. "path/to/eval.py"
    error: type[UnipackError]


EVAL = HookKind("eval", DEFAULT_FUNCTION, "path/to/eval.py", EvalError)


@dataclass(frozen=True)
class EvalHook:
    """A loaded evaluation function; calling it returns checked ``{metric: float}`` results."""

    spec: str
    function: EvalFunction

    def __call__(self, state_dict: Mapping[str, torch.Tensor], member_name: str) -> dict[str, float]:
        try:
            raw = self.function(state_dict, member_name)
        except Exception as exc:
            # Chained so that API users still get the user's traceback; the CLI shows the line.
            raise EvalError(
                f"eval {self.spec}: {type(exc).__name__}: {first_line(exc, _QUOTE_LIMIT)} (member {member_name!r})"
            ) from exc
        return check_results(raw, self.spec, member_name)


def check_results(raw: object, spec: str, member_name: str) -> dict[str, float]:
    """``raw`` as a plain ``dict[str, float]``, or an EvalError saying what is wrong with it."""
    where = f"(member {member_name!r})"
    if not isinstance(raw, Mapping):
        kind = "None" if raw is None else type(raw).__name__
        raise EvalError(
            f"eval {spec}: returned {kind}, expected dict[str, float] {where}; return e.g. {{'accuracy': 94.1}}"
        )
    if not raw:
        raise EvalError(
            f"eval {spec}: returned an empty dict {where}; return at least one metric, e.g. {{'accuracy': 94.1}}"
        )
    results: dict[str, float] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise EvalError(f"eval {spec}: metric name {_quote(key)} is {type(key).__name__}, expected str {where}")
        number = _as_float(value)
        if number is None:
            raise EvalError(f"eval {spec}: metric {key!r} is {_describe(value)}, expected a real number {where}")
        if not math.isfinite(number):
            raise EvalError(f"eval {spec}: metric {key!r} is {number} {where}; return finite numbers")
        results[key] = number
    return results


def pick_metric(results: Mapping[str, float], metric: str | None, spec: str) -> str:
    """The metric whose drop is reported: ``metric`` if given, else the first one returned."""
    if not results:
        raise EvalError(f"eval {spec}: returned no metrics; return at least one, e.g. {{'accuracy': 94.1}}")
    if metric is None:
        return next(iter(results))
    if metric not in results:
        available = ", ".join(repr(k) for k in results)
        raise EvalError(f"eval {spec}: no metric {metric!r} in its results; choose one of {available}")
    return metric


def load_eval(spec: str) -> EvalHook:
    """Load the function SPEC names (see the module docstring) without calling it."""
    spec = spec.strip()
    return EvalHook(spec=spec, function=load_function(spec, EVAL))


def load_function(spec: str, kind: HookKind) -> Callable[..., Any]:
    """Load the function SPEC names (a file or module, see the module docstring); errors per ``kind``."""
    spec = spec.strip()
    if not spec:
        raise kind.error(f"{kind.option}: empty SPEC; give {kind.example}[:function] or module[:function]")
    path, module_name, function = _parse(spec, kind)
    if path is not None:
        module = _load_file(spec, path, kind)
        where = str(path)
    else:
        assert module_name is not None
        module = _load_module(spec, module_name, kind)
        where = f"module {module_name!r}"
    fn = getattr(module, function, None)
    if fn is None:
        found = _function_names(module)
        hint = f" (it defines {', '.join(found)})" if found else ""
        raise kind.error(
            f"{kind.option} {spec}: {where} has no function {function!r}{hint}; name one with SPEC:function"
        )
    if not callable(fn):
        raise kind.error(
            f"{kind.option} {spec}: {function!r} in {where} is not callable ({type(fn).__name__}); "
            f"name a function with SPEC:function"
        )
    return fn


# ------------------------------------------------------------------------------------------
# parsing SPEC
# ------------------------------------------------------------------------------------------


def _parse(spec: str, kind: HookKind) -> tuple[Path | None, str | None, str]:
    """(path, None, function) for a file, (None, module, function) for a module."""
    # The whole SPEC as a path first, so that a file whose name contains ':' still loads.
    if _looks_like_path(spec):
        return _checked_path(spec, spec, kind), None, kind.default_function
    head, colon, tail = spec.rpartition(":")
    target, function = (head, tail) if colon else (spec, kind.default_function)
    if colon and not function.isidentifier():
        raise kind.error(f"{kind.option} {spec}: {function!r} is not a function name; use SPEC:function")
    if _looks_like_path(target):
        return _checked_path(spec, target, kind), None, function
    if not all(part.isidentifier() for part in target.split(".")):
        raise kind.error(
            f"{kind.option} {spec}: {target!r} is neither an existing file nor a module name; "
            f"give {kind.example}[:function] or module[:function]"
        )
    return None, target, function


def _looks_like_path(text: str) -> bool:
    return text.endswith(".py") or Path(text).is_file()


def _checked_path(spec: str, text: str, kind: HookKind) -> Path:
    path = Path(text)
    if not path.exists():
        raise kind.error(f"{kind.option} {spec}: file {text} not found; check the path")
    if not path.is_file():
        raise kind.error(f"{kind.option} {spec}: {text} is not a file; give {kind.example}")
    if path.suffix != ".py":
        raise kind.error(f"{kind.option} {spec}: {text} is not a .py file; give {kind.example}[:function]")
    return path.resolve()


# ------------------------------------------------------------------------------------------
# importing
# ------------------------------------------------------------------------------------------


def _load_file(spec: str, path: Path, kind: HookKind) -> ModuleType:
    """Execute ``path`` as a fresh module named after its full path.

    The name is unique per file, so two ``eval.py`` in different folders never collide, and the
    module sits in ``sys.modules`` (while running and afterwards) because dataclasses, pickling
    and ``typing.get_type_hints`` in the user's code look themselves up there.
    """
    name = f"unipack_user_{kind.option}_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise kind.error(f"{kind.option} {spec}: {path} cannot be loaded as a Python module; give {kind.example}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        with _on_sys_path(path.parent):  # so the file can import helper modules beside it
            module_spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise kind.error(
            f"{kind.option} {spec}: syntax error in {exc.filename or path}, line {exc.lineno}: {_quote_text(exc.msg)}"
        ) from None
    except (Exception, SystemExit) as exc:  # SystemExit: a script that calls sys.exit() on import
        sys.modules.pop(name, None)
        raise kind.error(
            f"{kind.option} {spec}: importing {path} raised {type(exc).__name__}: {first_line(exc, _QUOTE_LIMIT)}"
            f"{_user_line(exc, path)}"
        ) from exc
    return module


def _load_module(spec: str, module_name: str, kind: HookKind) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing *target* means the name is wrong; a module it imports being missing
        # (scikit-learn, say) is a broken environment, reported as an import failure below.
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise kind.error(
                f"{kind.option} {spec}: no module named {module_name!r}; check the name, or give a path to a .py file"
            ) from None
        raise kind.error(
            f"{kind.option} {spec}: importing module {module_name!r} raised ModuleNotFoundError: "
            f"{first_line(exc, _QUOTE_LIMIT)}{_last_line(exc)}"
        ) from exc
    except SyntaxError as exc:
        raise kind.error(
            f"{kind.option} {spec}: syntax error in {exc.filename}, line {exc.lineno}: {_quote_text(exc.msg)}"
        ) from None
    except (Exception, SystemExit) as exc:
        raise kind.error(
            f"{kind.option} {spec}: importing module {module_name!r} raised {type(exc).__name__}: "
            f"{first_line(exc, _QUOTE_LIMIT)}{_last_line(exc)}"
        ) from exc


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    """``directory`` first on ``sys.path`` for the duration only: unipack leaves no trace there."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if sys.path and sys.path[0] == entry:
            del sys.path[0]
        else:  # the user's code reordered sys.path: remove our one entry wherever it went
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def _function_names(module: ModuleType) -> list[str]:
    """Up to five public functions the module defines itself (to suggest a SPEC:function)."""
    names = [
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
    ]
    return names[:5] + (["..."] if len(names) > 5 else [])


# ------------------------------------------------------------------------------------------
# describing user values in one short line
# ------------------------------------------------------------------------------------------


def _as_float(value: object) -> float | None:
    """A real number as float; None for anything else (bools, strings, complex, big tensors)."""
    if isinstance(value, (bool, np.bool_)):  # True is an int, but never a metric
        return None
    if isinstance(value, numbers.Real):  # int, float, numpy integer/floating scalars
        return float(value)
    torch = sys.modules.get("torch")  # a tensor result means the user's code imported torch already
    array: Any = value  # a numpy array or torch tensor below
    if isinstance(value, _array_types()) and array.ndim == 0:
        if torch is not None and isinstance(value, torch.Tensor):
            ok = not array.dtype.is_complex and array.dtype != torch.bool
        else:
            ok = array.dtype.kind in "iuf"
        return float(array.item()) if ok else None
    return None


def _array_types() -> tuple[type, ...]:
    """numpy arrays, and torch tensors if torch is loaded (unipack's CLI does not import it to start)."""
    torch = sys.modules.get("torch")
    return (np.ndarray, torch.Tensor) if torch is not None else (np.ndarray,)


def _describe(value: object) -> str:
    if value is None:
        return "None"
    if isinstance(value, _array_types()):
        array: Any = value
        return f"a {type(value).__name__} of shape {tuple(array.shape)} and dtype {array.dtype}"
    return f"{type(value).__name__} {_quote(value)}"


def _quote(value: object) -> str:
    return _quote_text(repr(value))


def _quote_text(text: str) -> str:
    return text if len(text) <= _QUOTE_LIMIT else text[: _QUOTE_LIMIT - 1] + "…"


def _user_line(exc: BaseException, path: Path) -> str:
    """`` (line N)``: the deepest traceback frame inside the user's file, if any."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f" (line {lines[-1]})" if lines else ""


def _last_line(exc: BaseException) -> str:
    """`` (F, line N)``: where the exception was raised, to point at the culprit.

    importlib's own frames (``<frozen importlib._bootstrap>``) say nothing to the user: skipped.
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
