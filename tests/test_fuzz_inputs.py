"""A short, seeded run of the input fuzzer (``tools/fuzz_inputs.py``): 20 mutated inputs through
``unipack merge`` / ``unipack add``, each allowed only exit 0 or exit 1 with one line on stderr.

The harness runs as its own process, as from the command line: it forks one child per run
after importing torch once, which must not happen inside the test process (whose thread pools
earlier tests may have started). Longer runs: ``python tools/fuzz_inputs.py --iterations 500``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "fuzz_inputs.py"


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_inputs", _TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_inputs", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fuzz_inputs = _load_tool()


@pytest.mark.parametrize("seed", [11, 12])
def test_fuzz_inputs_short_run_has_no_findings(tmp_path: Path, seed: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(_TOOL), "--seed", str(seed), "--iterations", "20", "--findings", str(tmp_path / "found")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("executions:"))
    assert "findings: 0 " in summary, proc.stdout[-4000:]
    assert not (tmp_path / "found").exists()


def test_the_oracle_allows_only_success_or_one_error_line() -> None:
    judge, outcome = fuzz_inputs.judge, fuzz_inputs.Outcome
    assert judge(outcome(0, "summary", "", 0.1)) is None
    assert judge(outcome(1, "", "Error: x.safetensors: truncated; re-save it\n", 0.1)) is None
    assert judge(outcome(1, "", "Error: a\nError: b\n", 0.1)) is not None
    assert judge(outcome(0, "", "x.py:3: RuntimeWarning: overflow encountered\n", 0.1)) is not None
    assert judge(outcome(3, "", "Error: internal error: KeyError: 'w' (a bug)\n", 0.1)) is not None
    assert judge(outcome(1, "", "Traceback (most recent call last):\n", 0.1)) is not None
    assert judge(outcome(None, "", "", 20.0)) == "timeout"
    assert judge(outcome(-9, "", "", 1.0)) is not None
