"""Outputs in hostile places (issue 16): OS errors on an output path, names at the file system's
limit, outputs that would replace an input, symlinked targets, SIGTERM/SIGHUP, and the temp
files a killed writer leaves behind.

Every refusal or failure here is one line on stderr and exit 1 (never 3, never a traceback),
and leaves the folder as it was.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import Result
from conftest import listing, run, small_specs, write_population

import unipack
from unipack.cli.commands import INTERRUPTED
from unipack.format.atomic import NAME_MAX, TEMP_MARK, remove_stale_temps, temp_prefix


def one_line_error(result: Result, *fragments: str) -> str:
    """The command failed with exit 1 and exactly one ``Error: ...`` line on stderr."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "internal error" not in lines[0] and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def made(tmp_path: Path) -> tuple[list[Path], Path]:
    """Four small checkpoints in ``in/`` and ``b.upk`` merged from the first three."""
    pop = write_population(tmp_path / "in", small_specs(), n=4)
    bundle = tmp_path / "b.upk"
    unipack.merge(pop.paths[:3], bundle, lossless="off", baselines=False)
    return list(pop.paths), bundle


# --------------------------------------------------------------------------------------------
# item 5: an OS error on an output is one line and exit 1
# --------------------------------------------------------------------------------------------

TOO_LONG = "q" * (NAME_MAX + 20)

OUTPUT_ERRORS = {
    # case: (command after the bundle/inputs are known, fragments of the one line)
    "extract_into_proc": (
        ["extract", "{b}", "-m", "ft0", "-o", "/proc/x.safetensors"],
        ["cannot create a file in /proc"],
    ),
    "report_png_into_proc": (["report", "{b}", "--png", "/proc/x.png"], ["cannot create a file in /proc"]),
    "extract_name_too_long": (["extract", "{b}", "-m", "ft0", "-o", "{t}/" + TOO_LONG], ["File name too long"]),
    "merge_name_too_long": (["merge", "{i0}", "{i1}", "-o", "{t}/" + TOO_LONG, "-q"], ["File name too long"]),
    "add_name_too_long": (["add", "{b}", "{i3}", "-o", "{t}/" + TOO_LONG], ["File name too long"]),
    "report_png_name_too_long": (["report", "{b}", "--png", "{t}/" + TOO_LONG], ["File name too long"]),
    "hf_folder_name_too_long": (["extract", "{b}", "-m", "ft0", "--format", "hf", "-o", "{t}/" + TOO_LONG], []),
    "extract_under_a_file": (
        ["extract", "{b}", "-m", "ft0", "-o", "{t}/afile/x.safetensors"],
        ["{t}/afile is a file, not a folder"],
    ),
    "merge_under_a_file_deeper": (
        ["merge", "{i0}", "{i1}", "-o", "{t}/afile/sub/x.upk", "-q"],
        ["{t}/afile is a file, not a folder"],
    ),
    "extract_all_under_a_file": (
        ["extract", "{b}", "--all", "-o", "{t}/afile/out"],
        ["{t}/afile is a file, not a folder"],
    ),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_ERRORS))
def test_os_errors_on_outputs_are_one_line_and_exit_1(made: tuple[list[Path], Path], tmp_path: Path, case: str) -> None:
    args, fragments = OUTPUT_ERRORS[case]
    if "/proc/" in " ".join(args) and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc (a folder where no file can be created)")
    if "--png" in args:
        pytest.importorskip("matplotlib")
    paths, bundle = made
    (tmp_path / "afile").write_bytes(b"a plain file")
    names = {"b": str(bundle), "t": str(tmp_path), **{f"i{k}": str(p) for k, p in enumerate(paths)}}
    before = listing(tmp_path), bundle.read_bytes()
    one_line_error(run(*(a.format(**names) for a in args)), *(f.format(**names) for f in fragments))
    assert (listing(tmp_path), bundle.read_bytes()) == before


def test_long_but_legal_target_names_are_written(made: tuple[list[Path], Path], tmp_path: Path) -> None:
    """A target name of NAME_MAX bytes is legal; its temp, spool and lock names are shortened."""
    paths, bundle = made
    out = tmp_path / "long"
    out.mkdir()
    member = out / ("é" * 121 + "m" * (NAME_MAX - 242 - len(".safetensors")) + ".safetensors")
    assert len(member.name.encode()) == NAME_MAX
    assert run("extract", bundle, "-m", "ft0", "-o", member).exit_code == 0
    grown = out / ("g" * (NAME_MAX - 4) + ".upk")
    result = run("merge", *paths[:3], "-o", grown, "-q")
    assert result.exit_code == 0, result.output
    result = run("add", grown, paths[3], "--name", "extra")  # in place: under a shortened lock name
    assert result.exit_code == 0, result.output
    folder = out / ("h" * NAME_MAX)
    result = run("extract", grown, "-m", "extra", "--format", "hf", "-o", folder)
    assert result.exit_code == 0, result.output
    assert sorted(listing(out)) == sorted([member.name, grown.name, folder.name])
    with unipack.open(grown) as b:
        assert b.members == ["ft0", "ft1", "ft2", "extra"] and b.verify() == []
    # the temp prefix fits: prefix + 8 random characters + ".spool"
    assert len((temp_prefix(grown) + "x" * 8 + ".spool").encode()) <= NAME_MAX


def test_member_names_must_fit_as_file_names(made: tuple[list[Path], Path], tmp_path: Path) -> None:
    """A member comes back as <name>.safetensors: merge and add refuse names longer than
    NAME_MAX - 12 bytes (counted in UTF-8), and names at the limit round-trip through --all."""
    paths, bundle = made
    limit = NAME_MAX - len(".safetensors")
    at_limit, over = "n" * limit, "é" * (limit // 2 + 1)  # 244 bytes in 122 characters
    out = tmp_path / "named.upk"
    before = listing(tmp_path)
    line = one_line_error(
        run("merge", paths[0], paths[1], "-o", out, "--name", f"{paths[1]}={over}", "-q"),
        str(paths[1]),
        f"at most {limit} bytes",
    )
    assert "--name" in line
    one_line_error(run("add", bundle, paths[3], "--name", over), f"at most {limit} bytes", "--name")
    assert listing(tmp_path) == before
    result = run("merge", paths[0], paths[1], "-o", out, "--name", f"{paths[1]}={at_limit}", "-q")
    assert result.exit_code == 0, result.output
    result = run("add", out, paths[3], "--name", "m" * limit)
    assert result.exit_code == 0, result.output
    result = run("extract", out, "--all", "-o", tmp_path / "all")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path / "all") == sorted(
        ["ft0.safetensors", f"{at_limit}.safetensors", "m" * limit + ".safetensors"]
    )


# --------------------------------------------------------------------------------------------
# item 8: an output never replaces an input; a symlinked target stays a link
# --------------------------------------------------------------------------------------------


def test_outputs_onto_inputs_are_refused(made: tuple[list[Path], Path], tmp_path: Path) -> None:
    paths, bundle = made
    link = tmp_path / "link.upk"
    link.symlink_to(bundle)
    hard = tmp_path / "hard.upk"
    os.link(bundle, hard)
    state = {p: p.read_bytes() for p in [bundle, *paths]}

    def refused(*args: object) -> None:
        names = listing(tmp_path)
        one_line_error(run(*args), "an input of this command", "give another output path")
        assert {p: p.read_bytes() for p in state} == state and listing(tmp_path) == names

    for spelling in (bundle, link, hard, tmp_path / "in" / ".." / "b.upk"):
        refused("extract", bundle, "-m", "ft0", "-o", spelling, "--force")
    refused("merge", paths[0], paths[1], "-o", paths[1], "--force", "-q")
    refused("add", bundle, paths[3], "-o", paths[3], "--force")
    if _has_matplotlib():
        refused("report", bundle, "--png", link)
        refused("report", bundle, "--png", paths[0], "--originals", paths[0].parent)
    # --all into the bundle's own folder, where a member's file name is the bundle's
    named = tmp_path / "ft1.safetensors"
    os.link(bundle, named)
    refused("extract", bundle, "--all", "-o", tmp_path, "--force")
    named.unlink()
    # -o naming the bundle itself with --force is an add in place, not a refusal
    result = run("add", link, paths[3], "--name", "again", "-o", bundle, "--force")
    assert result.exit_code == 0, result.output
    with unipack.open(bundle) as b:
        assert b.members[-1] == "again"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_writes_through_a_symlink_replace_the_file_it_names(made: tuple[list[Path], Path], tmp_path: Path) -> None:
    paths, bundle = made
    real = tmp_path / "store" / "real.upk"
    real.parent.mkdir()
    bundle.rename(real)
    link = tmp_path / "b.upk"
    link.symlink_to(Path("store") / "real.upk")  # relative, as ln -s writes it
    result = run("add", link, paths[3], "--name", "added")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(Path("store") / "real.upk")
    with unipack.open(real) as b:
        assert b.members == ["ft0", "ft1", "ft2", "added"] and b.verify() == []
    assert listing(real.parent) == ["real.upk"]  # no temp, spool or lock file left
    # extract onto a link to a file: the file changes, the link stays
    target = tmp_path / "store" / "member.safetensors"
    target.write_bytes(b"old")
    out = tmp_path / "member.safetensors"
    out.symlink_to(target)
    result = run("extract", link, "-m", "added", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert out.is_symlink() and target.read_bytes()[:8] != b"old"
    assert set(unipack.open(real).load("added")) == set(unipack.open(real).load("ft0"))


# --------------------------------------------------------------------------------------------
# item 9: a bundle larger than its inputs says so
# --------------------------------------------------------------------------------------------


def test_ratio_below_one_says_larger(made: tuple[list[Path], Path], tmp_path: Path) -> None:
    paths, _ = made  # 4 tiny checkpoints: the bundle's header outweighs them
    result = run("merge", *paths[:2], "-o", tmp_path / "tiny.upk", "-q")
    assert result.exit_code == 0, result.output
    ratio = [line for line in result.stdout.splitlines() if re.match(r"\W*ratio\b", line)]
    assert ratio and "x larger, at worst" in ratio[0] and "smaller" not in ratio[0], ratio
    result = run("add", tmp_path / "tiny.upk", paths[3])
    assert result.exit_code == 0, result.output
    ratio = [line for line in result.stdout.splitlines() if re.match(r"\W*ratio\b", line)]
    assert ratio and "x larger than its inputs" in ratio[0] and "smaller" not in ratio[0], ratio


# --------------------------------------------------------------------------------------------
# item 7: SIGTERM and SIGHUP end a command like Ctrl-C; a killed writer's temp files go away
# --------------------------------------------------------------------------------------------

# A merge that announces itself once past planning, then lingers on its first tensor: the spool
# file is open and the output not yet renamed into place (as in test_cli_newcomer's SIGINT test).
SLOW_MERGE = textwrap.dedent(
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


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_during_merge_write_nothing(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    pop = write_population(tmp_path / "in", small_specs(), n=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "b.upk").write_bytes(b"an older bundle")  # --force: must survive
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_MERGE,
            "merge",
            *map(str, pop.paths),
            "-o",
            str(out_dir / "b.upk"),
            "--force",
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "UNIPACK_DEBUG": ""},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert any(n.endswith(".spool") for n in listing(out_dir)), "the spool should exist when the signal lands"
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code, err
    assert err.strip().splitlines()[-1] == INTERRUPTED.replace("interrupted", f"terminated by {sig.name}")
    assert "Traceback" not in err
    assert listing(out_dir) == ["b.upk"]
    assert (out_dir / "b.upk").read_bytes() == b"an older bundle"


HOLD_TEMP = textwrap.dedent(
    """
    import sys, time
    from unipack.format.atomic import atomic_write
    with atomic_write(sys.argv[1], force=True) as f:
        f.write(b"half a member")
        f.flush()
        print("ready", flush=True)
        time.sleep(60)
    """
)


def test_the_next_write_removes_a_killed_writers_temp_files(made: tuple[list[Path], Path], tmp_path: Path) -> None:
    """SIGKILL leaves the temp file; the next write to the same target removes it, and nothing
    else: not a live writer's, not another target's, not a look-alike of another program."""
    _, bundle = made
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "m.safetensors"
    # a live writer of m.safetensors, holding its temp file
    live = subprocess.Popen([sys.executable, "-c", HOLD_TEMP, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "ready"
        (held,) = listing(out_dir)
        # a writer of the same target killed outright while writing
        killed = subprocess.Popen([sys.executable, "-c", HOLD_TEMP, str(target)], stdout=subprocess.PIPE, text=True)
        assert killed.stdout is not None and killed.stdout.readline().strip() == "ready"
        killed.kill()
        killed.wait()
        (dead,) = set(listing(out_dir)) - {held}
        assert dead.startswith(f".m.safetensors.{TEMP_MARK}") and dead.endswith(".tmp")
        keep = [
            f".m.safetensors.{TEMP_MARK}abc.tmp",  # not our random part
            ".m.safetensors.abcdefgh.tmp",  # another program's mkstemp, same target
            f".n.safetensors.{TEMP_MARK}abcdefgh.tmp",  # another target's
            f".m.safetensors.{TEMP_MARK}abcdefgh.tmp.bak",
        ]
        for name in keep:
            (out_dir / name).write_bytes(b"not ours to remove")
        spool = out_dir / f".m.safetensors.{TEMP_MARK}k1ll3d_x.spool"  # a killed merge's spool, same shape
        spool.write_bytes(b"blobs")
        result = run("extract", bundle, "-m", "ft1", "-o", target)
        assert result.exit_code == 0, result.output
        assert listing(out_dir) == sorted([held, "m.safetensors", *keep])
        assert remove_stale_temps(target) == []  # the live writer's file still is not stale
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(target) == [out_dir / held]  # now it is
    assert listing(out_dir) == sorted(["m.safetensors", *keep])
