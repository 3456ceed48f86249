"""A newcomer's first hour (issue 15): Ctrl-C, missing output folders, one folder of checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from click.testing import CliRunner
from conftest import listing, small_specs, write_population

import unipack
from unipack.cli import cli
from unipack.cli.commands import INTERRUPTED

# A merge that announces itself once it is past planning, then lingers on its first tensor so the
# parent can interrupt it there (mid-merge, spool file open, output not yet renamed into place).
CHILD = textwrap.dedent(
    """
    import sys, time
    from unipack.pack import dense
    store = dense.Merger._store
    def slow_store(self, plan):
        print("ready", flush=True)
        time.sleep(60)
        return store(self, plan)
    dense.Merger._store = slow_store
    from unipack.cli import main
    sys.argv = ["unipack", *sys.argv[1:]]
    main()
    """
)


def test_sigint_during_merge_exits_130_and_writes_nothing(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", small_specs(), n=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "b.upk").write_bytes(b"an older bundle")  # --force: must survive the interrupt
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "merge", *map(str, pop.paths), "-o", str(out_dir / "b.upk"), "--force", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "UNIPACK_DEBUG": ""},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert err.strip().splitlines()[-1] == INTERRUPTED
    assert "Traceback" not in err
    assert listing(out_dir) == ["b.upk"]
    assert (out_dir / "b.upk").read_bytes() == b"an older bundle"


def test_keyboard_interrupt_in_any_command_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import unipack.cli.commands as commands

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "open_bundle", interrupted)
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "b.upk")])
    assert result.exit_code == 130
    assert result.output.strip() == INTERRUPTED


def test_outputs_are_written_into_missing_folders(tmp_path: Path) -> None:
    """Every command that writes creates the folders its output needs, like ``mkdir -p``."""
    pop = write_population(tmp_path / "in", small_specs(), n=3)
    bundle = tmp_path / "a" / "b" / "bundle.upk"
    runner = CliRunner()
    result = runner.invoke(cli, ["merge", *map(str, pop.paths), "-o", str(bundle), "-q"])
    assert result.exit_code == 0, result.output
    assert bundle.is_file()
    member = tmp_path / "c" / "d" / "m.safetensors"
    result = runner.invoke(cli, ["extract", str(bundle), "--member", "ft0", "-o", str(member)])
    assert result.exit_code == 0, result.output
    assert member.is_file()
    grown = tmp_path / "e" / "grown.upk"
    result = runner.invoke(cli, ["add", str(bundle), str(pop.paths[0]), "--name", "again", "-o", str(grown)])
    assert result.exit_code == 0, result.output
    with unipack.open(grown) as b:
        assert "again" in b.members


def test_one_folder_of_checkpoints_says_what_to_type(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "ckpts", small_specs(), n=3)
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "ckpts"), "-o", str(tmp_path / "b.upk")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "holding 3 checkpoint files" in lines[0]
    assert f"unipack merge {tmp_path / 'ckpts'}/*.safetensors -o" in lines[0]
    assert "at least 2 checkpoints, got 1" not in lines[0]
    # and what it suggests works
    result = CliRunner().invoke(cli, ["merge", *map(str, pop.paths), "-o", str(tmp_path / "b.upk"), "-q"])
    assert result.exit_code == 0, result.output


def test_one_model_folder_is_one_member(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    write_population(tmp_path / "in", small_specs(), n=1).paths[0].rename(folder / "model.safetensors")
    result = CliRunner().invoke(cli, ["merge", str(folder), "-o", str(tmp_path / "b.upk")])
    assert result.exit_code == 1
    assert "is one model folder, so one member" in result.output


def test_headline_merge_of_heads_of_different_sizes_needs_no_flag(tmp_path: Path) -> None:
    """``unipack merge vit-*.safetensors -o bundle.upk``: task heads of other sizes are stored raw
    per member by default, and the summary names them; ``--strict-shapes`` refuses instead."""
    from conftest import TensorSpec

    specs = {**small_specs(), "classifier.weight": TensorSpec((3, 12), kind="head")}
    pop = write_population(tmp_path / "in", specs, n=3)
    out = tmp_path / "bundle.upk"
    result = CliRunner().invoke(cli, ["merge", *map(str, pop.paths), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "task-specific" in result.output and "classifier.weight" in result.output
    with unipack.open(out) as b:
        head = next(t for t in b.manifest.tensors if t.name == "classifier.weight")
        assert head.storage == "raw" and head.shape is None
        shapes = {b.load(m)["classifier.weight"].shape[0] for m in b.members}
        assert len(shapes) == 3  # every member got its own head back
        assert b.manifest.options["raw_mismatched"] is True
    strict = CliRunner().invoke(cli, ["merge", *map(str, pop.paths), "-o", str(tmp_path / "s.upk"), "--strict-shapes"])
    assert strict.exit_code == 1
    assert "classifier.weight" in strict.output and "--strict-shapes" in strict.output
    assert not (tmp_path / "s.upk").exists()
