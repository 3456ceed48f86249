"""``unipack.allocator``: freed tensor-sized blocks stay in the process for reuse.

Checked by what the setting is for, in fresh processes (it is process-wide): after a large
array is freed, the process's resident memory stays up (the block is kept for the next array)
where it is applied, and falls back where it is not (glibc unmaps the block).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import unipack

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt only",
)

#: Resident bytes of a 64 MiB array made, touched and freed, measured by the child.
PROBE = """
import json, sys
import numpy as np
from unipack.allocator import reuse_freed_memory

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

applied = reuse_freed_memory() if sys.argv[1] == "apply" else None
again = reuse_freed_memory() if sys.argv[1] == "apply" else None
before = resident()
block = np.ones(8 << 20)  # 64 MiB, every page written
during = resident()
del block
after = resident()
print(json.dumps({"applied": applied, "again": again, "kept": after - before, "grew": during - before}))
"""


def _probe(mode: str, **env: str) -> dict[str, object]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    child_env.pop("UNIPACK_MALLOC", None)
    child_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=child_env, check=True, timeout=120
    )
    return json.loads(out.stdout)


def test_applied_freed_block_stays_for_reuse() -> None:
    probe = _probe("apply")
    assert probe["applied"] is True and probe["again"] is True
    assert probe["grew"] >= 60 << 20  # the array was resident
    assert probe["kept"] >= 60 << 20  # and its block still is, once freed


def test_without_it_glibc_returns_the_block() -> None:
    probe = _probe("none")
    assert probe["grew"] >= 60 << 20
    assert probe["kept"] < 16 << 20  # unmapped on free: what every new array then faults in again


@pytest.mark.parametrize("value", ["default", "off", "0", "no", "DEFAULT"])
def test_environment_turns_it_off(value: str) -> None:
    probe = _probe("apply", UNIPACK_MALLOC=value)
    assert probe["applied"] is False and probe["again"] is False
    assert probe["kept"] < 16 << 20


MERGE_THEN_PROBE = """
import sys, unipack
import unipack.allocator as allocator
assert allocator._applied is None
unipack.merge(sys.argv[1:3], sys.argv[3], force=True)
merged = allocator._applied
allocator._applied = None
with unipack.open(sys.argv[3]) as b:
    b.load_numpy(b.members[0])
print(merged, allocator._applied)
"""


def test_merge_and_load_apply_it(tmp_path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"w": rng.standard_normal((16, 8)).astype(np.float32)}, str(path))
        paths.append(str(path))
    env = {k: v for k, v in os.environ.items() if k != "UNIPACK_MALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", MERGE_THEN_PROBE, *paths, str(tmp_path / "b.upk")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    assert out.stdout.split() == ["True", "True"]


def test_bundles_are_the_same_bytes_either_way(tmp_path) -> None:
    """The setting changes where arrays live, never a number: a merge gives the same bytes."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        path = tmp_path / f"m{i}.safetensors"
        save_file(
            {"w": rng.standard_normal((64, 48)).astype(np.float32), "b": rng.standard_normal(48).astype(np.float32)},
            str(path),
        )
        paths.append(str(path))
    script = "import sys, unipack; unipack.merge(sys.argv[1:4], sys.argv[4], force=True)"
    outs = []
    for value in ("on", "default"):
        out = tmp_path / f"{value}.upk"
        env = {k: v for k, v in os.environ.items() if k != "UNIPACK_MALLOC"} | {"UNIPACK_MALLOC": value}
        subprocess.run([sys.executable, "-c", script, *paths, str(out)], env=env, check=True, timeout=300)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    with unipack.open(tmp_path / "on.upk") as bundle:
        assert bundle.members == ["m0", "m1", "m2"]
