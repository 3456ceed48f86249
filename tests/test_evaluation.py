"""``--eval SPEC``: loading the user's function by path or module, calling it, checking results."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from unipack.errors import EvalError, UnipackError
from unipack.usercode import EvalHook, check_results, load_eval, pick_metric

STATE = {"w": torch.ones(2, 2)}


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    return write(
        tmp_path / "my_eval.py",
        """
        import torch

        def evaluate(state_dict, member_name):
            return {"total": float(sum(t.sum() for t in state_dict.values())), "n": len(member_name)}

        def score(state_dict, member_name):
            return {"score": 1.5}
    """,
    )


def eval_error(spec: str) -> str:
    with pytest.raises(EvalError) as info:
        load_eval(spec)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------


def test_load_by_path_uses_evaluate(eval_file: Path) -> None:
    hook = load_eval(str(eval_file))
    assert isinstance(hook, EvalHook) and hook.spec == str(eval_file)
    assert hook(STATE, "pets") == {"total": 4.0, "n": 4.0}


def test_load_by_path_and_function(eval_file: Path) -> None:
    hook = load_eval(f"{eval_file}:score")
    assert hook.function.__name__ == "score"
    assert hook(STATE, "pets") == {"score": 1.5}


def test_relative_path(eval_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(eval_file.parent)
    assert load_eval("my_eval.py:score")(STATE, "x") == {"score": 1.5}


def test_load_by_module_and_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path / "user_metrics_mod.py",
        """
        def evaluate(state_dict, member_name):
            return {"accuracy": 90.0}

        def other(state_dict, member_name):
            return {"f1": 0.5}
    """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert load_eval("user_metrics_mod")(STATE, "a") == {"accuracy": 90.0}
        assert load_eval("user_metrics_mod:other")(STATE, "a") == {"f1": 0.5}
    finally:
        sys.modules.pop("user_metrics_mod", None)


def test_load_demo_module() -> None:
    from unipack.demo.evaluate import evaluate

    hook = load_eval("unipack.demo.evaluate:evaluate")
    assert hook.function is evaluate and callable(hook)
    assert load_eval("unipack.demo.evaluate").function is evaluate  # default function name


def test_same_basename_in_two_folders_are_two_functions(tmp_path: Path) -> None:
    a = write(tmp_path / "a" / "eval.py", "def evaluate(s, m):\n    return {'which': 1}\n")
    b = write(tmp_path / "b" / "eval.py", "def evaluate(s, m):\n    return {'which': 2}\n")
    hook_a, hook_b = load_eval(str(a)), load_eval(str(b))
    assert hook_a.function is not hook_b.function
    assert hook_a(STATE, "m") == {"which": 1.0}
    assert hook_b(STATE, "m") == {"which": 2.0}
    assert hook_a.function.__module__ != hook_b.function.__module__
    assert hook_a.function.__module__ in sys.modules  # dataclasses/pickling look the module up


def test_user_file_can_use_dataclasses_and_sibling_imports(tmp_path: Path) -> None:
    write(tmp_path / "helpers_for_eval.py", "SCALE = 3.0\n")
    path = write(
        tmp_path / "with_helpers.py",
        """
        from dataclasses import dataclass
        from helpers_for_eval import SCALE

        @dataclass
        class Result:
            value: float

        def evaluate(state_dict, member_name):
            return {"v": Result(SCALE).value}
    """,
    )
    before = list(sys.path)
    try:
        assert load_eval(str(path))(STATE, "m") == {"v": 3.0}
        assert sys.path == before, "load_eval left its folder on sys.path"
    finally:
        sys.modules.pop("helpers_for_eval", None)


def test_hook_is_called_once_per_call_with_the_member_name(tmp_path: Path) -> None:
    path = write(
        tmp_path / "counting.py",
        """
        CALLS = []

        def evaluate(state_dict, member_name):
            CALLS.append((member_name, sorted(state_dict)))
            return {"calls": len(CALLS)}
    """,
    )
    hook = load_eval(str(path))
    assert hook(STATE, "pets") == {"calls": 1.0}
    assert hook(STATE, "cars") == {"calls": 2.0}
    assert sys.modules[hook.function.__module__].CALLS == [("pets", ["w"]), ("cars", ["w"])]


# ------------------------------------------------------------------------------------------
# load errors
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    message = eval_error(f"{missing}:score")
    assert message == f"eval {missing}:score: file {missing} not found; check the path"


def test_not_a_py_file(tmp_path: Path) -> None:
    other = tmp_path / "eval.txt"
    other.write_text("def evaluate(s, m): return {}\n")
    assert eval_error(str(other)) == (f"eval {other}: {other} is not a .py file; give path/to/eval.py[:function]")


def test_neither_file_nor_module() -> None:
    assert eval_error("./missing-eval") == (
        "eval ./missing-eval: './missing-eval' is neither an existing file "
        "nor a module name; give path/to/eval.py[:function] or "
        "module[:function]"
    )


def test_empty_spec_and_bad_function_name(eval_file: Path) -> None:
    assert "empty SPEC" in eval_error("  ")
    assert "'not-a-name' is not a function name" in eval_error(f"{eval_file}:not-a-name")


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.py", "x = 1\n\ndef evaluate(s, m)\n    return {}\n")
    message = eval_error(str(path))
    assert message.startswith(f"eval {path}: syntax error in {path}, line 3: "), message


def test_import_raising_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "raising.py", "import os\n\nraise RuntimeError('no GPU here\\nsecond line')\n")
    message = eval_error(str(path))
    assert message == f"eval {path}: importing {path} raised RuntimeError: no GPU here (line 3)"
    assert not [m for m in sys.modules.values() if getattr(m, "__file__", None) == str(path)]


def test_import_calling_sys_exit(tmp_path: Path) -> None:
    path = write(tmp_path / "script.py", "import sys\nsys.exit(2)\n")
    assert eval_error(str(path)) == f"eval {path}: importing {path} raised SystemExit: 2 (line 2)"


def test_missing_module() -> None:
    assert eval_error("no_such_module_xyz:score") == (
        "eval no_such_module_xyz:score: no module named "
        "'no_such_module_xyz'; check the name, or give a "
        "path to a .py file"
    )
    assert "no module named 'unipack.no_such_thing'" in eval_error("unipack.no_such_thing")


def test_module_whose_dependency_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "needs_dep_mod.py", "import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = eval_error("needs_dep_mod")
    assert message == (
        f"eval needs_dep_mod: importing module 'needs_dep_mod' raised ModuleNotFoundError: "
        f"No module named 'not_installed_dep_xyz' ({tmp_path / 'needs_dep_mod.py'}, line 1)"
    )


def test_missing_function_lists_what_is_there(eval_file: Path) -> None:
    message = eval_error(f"{eval_file}:scorer")
    assert message == (
        f"eval {eval_file}:scorer: {eval_file} has no function 'scorer' "
        f"(it defines evaluate, score); name one with SPEC:function"
    )


def test_default_function_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.py", "X = 1\n")
    assert eval_error(str(path)) == (f"eval {path}: {path} has no function 'evaluate'; name one with SPEC:function")


def test_not_callable(tmp_path: Path) -> None:
    path = write(tmp_path / "const.py", "evaluate = 3\n")
    assert eval_error(str(path)) == (
        f"eval {path}: 'evaluate' in {path} is not callable (int); name a function with SPEC:function"
    )


def test_eval_error_is_a_unipack_error() -> None:
    assert issubclass(EvalError, UnipackError)


# ------------------------------------------------------------------------------------------
# calling: exceptions and results
# ------------------------------------------------------------------------------------------


def hook_returning(value: object) -> EvalHook:
    return EvalHook(spec="e.py", function=lambda state_dict, member_name: value)


def call_error(value: object) -> str:
    with pytest.raises(EvalError) as info:
        hook_returning(value)(STATE, "pets")
    message = str(info.value)
    assert "\n" not in message and len(message) <= 300, message
    return message


def test_user_function_raising(tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.py",
        """
        def evaluate(state_dict, member_name):
            raise KeyError(f"{member_name}: unknown task")
    """,
    )
    hook = load_eval(str(path))
    with pytest.raises(EvalError) as info:
        hook(STATE, "pets")
    assert str(info.value) == f"""eval {path}: KeyError: 'pets: unknown task' (member 'pets')"""
    assert isinstance(info.value.__cause__, KeyError)  # the user's traceback stays reachable


def test_user_exception_is_cut_to_one_short_line() -> None:
    def evaluate(state_dict: object, member_name: str) -> dict[str, float]:
        raise ValueError("x" * 1000 + "\nsecond line")

    with pytest.raises(EvalError) as info:
        EvalHook("e.py", evaluate)(STATE, "pets")
    message = str(info.value)
    assert "\n" not in message and len(message) <= 300 and "second" not in message
    assert message.startswith("eval e.py: ValueError: xxx") and message.endswith("… (member 'pets')")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ("eval e.py: returned None, expected dict[str, float] (member 'pets'); return e.g. {'accuracy': 94.1}")),
        (
            [("a", 1.0)],
            ("eval e.py: returned list, expected dict[str, float] (member 'pets'); return e.g. {'accuracy': 94.1}"),
        ),
        (0.5, ("eval e.py: returned float, expected dict[str, float] (member 'pets'); return e.g. {'accuracy': 94.1}")),
        (
            {},
            ("eval e.py: returned an empty dict (member 'pets'); return at least one metric, e.g. {'accuracy': 94.1}"),
        ),
        ({"a": "x"}, "eval e.py: metric 'a' is str 'x', expected a real number (member 'pets')"),
        ({"a": True}, "eval e.py: metric 'a' is bool True, expected a real number (member 'pets')"),
        (
            {"a": np.bool_(False)},
            (f"eval e.py: metric 'a' is bool {np.bool_(False)!r}, expected a real number (member 'pets')"),
        ),  # the repr is np.False_ on numpy 2, False before
        ({"a": 1 + 2j}, "eval e.py: metric 'a' is complex (1+2j), expected a real number (member 'pets')"),
        ({"a": None}, "eval e.py: metric 'a' is None, expected a real number (member 'pets')"),
        (
            {"a": torch.ones(3)},
            (
                "eval e.py: metric 'a' is a Tensor of shape (3,) and dtype torch.float32, "
                "expected a real number (member 'pets')"
            ),
        ),
        (
            {"a": torch.tensor(True)},
            (
                "eval e.py: metric 'a' is a Tensor of shape () and dtype torch.bool, "
                "expected a real number (member 'pets')"
            ),
        ),
        ({"a": float("nan")}, "eval e.py: metric 'a' is nan (member 'pets'); return finite numbers"),
        ({"a": 1.0, "b": -math.inf}, "eval e.py: metric 'b' is -inf (member 'pets'); return finite numbers"),
        ({"a": np.float32("inf")}, "eval e.py: metric 'a' is inf (member 'pets'); return finite numbers"),
        ({3: 1.0}, "eval e.py: metric name 3 is int, expected str (member 'pets')"),
    ],
)
def test_bad_results(value: object, expected: str) -> None:
    assert call_error(value) == expected


def test_numbers_are_converted_to_plain_floats() -> None:
    raw = {
        "int": 3,
        "float": 94.1,
        "np32": np.float32(0.25),
        "np64": np.float64(-1.5),
        "npint": np.int64(7),
        "t0": torch.tensor(2.5),
        "t0_half": torch.tensor(0.5, dtype=torch.float16),
        "t0_int": torch.tensor(4),
        "np0d": np.array(1.25),
    }
    results = hook_returning(raw)(STATE, "pets")
    assert results == {
        "int": 3.0,
        "float": 94.1,
        "np32": 0.25,
        "np64": -1.5,
        "npint": 7.0,
        "t0": 2.5,
        "t0_half": 0.5,
        "t0_int": 4.0,
        "np0d": 1.25,
    }
    assert all(type(v) is float for v in results.values())
    assert list(results) == list(raw)  # order kept: the first metric is the default one


def test_any_mapping_is_accepted() -> None:
    from types import MappingProxyType

    assert check_results(MappingProxyType({"a": 1}), "e.py", "m") == {"a": 1.0}


# ------------------------------------------------------------------------------------------
# pick_metric
# ------------------------------------------------------------------------------------------


def test_pick_metric_default_is_first() -> None:
    assert pick_metric({"accuracy": 94.1, "f1": 0.9}, None, "e.py") == "accuracy"


def test_pick_metric_explicit() -> None:
    assert pick_metric({"accuracy": 94.1, "f1": 0.9}, "f1", "e.py") == "f1"


def test_pick_metric_missing_lists_available() -> None:
    with pytest.raises(EvalError) as info:
        pick_metric({"accuracy": 94.1, "f1": 0.9}, "loss", "e.py")
    assert str(info.value) == "eval e.py: no metric 'loss' in its results; choose one of 'accuracy', 'f1'"


def test_pick_metric_no_results() -> None:
    with pytest.raises(EvalError, match="returned no metrics"):
        pick_metric({}, None, "e.py")
