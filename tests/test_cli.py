"""The ``unipack`` command line, through ``click.testing.CliRunner``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from conftest import (
    ALL_BAD_CASES,
    bad_case,
    bits_equal,
    listing,
    make_bundle,
    read_safetensors,
    run,
    small_specs,
    standard_specs,
    write_population,
)

import unipack


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def nonblank_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_error(result: Result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = nonblank_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "internal error" not in lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------
# the happy path: merge -> info -> info --json -> extract
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("cli")
    pop = write_population(d / "in", standard_specs(), n=4, seed=17)
    out = d / "bundle.upk"
    result = run("merge", *pop.paths, "-o", out, "--max-error", "0.02")
    assert_ok(result)
    return pop, out, result


def test_merge_writes_bundle_and_prints_summary(merged) -> None:
    pop, out, result = merged
    assert out.is_file()
    assert "ratio" in result.output
    with unipack.open(out) as b:
        assert b.members == pop.names
        assert b.manifest.options["max_error"] == 0.02
        worst = b.summary().worst_error
    assert f"{worst:.3g}" in result.stdout
    assert result.stderr == ""  # the summary is the result: stdout; no progress where nobody watches


def test_info_table_shows_ratio_and_worst_error(merged) -> None:
    _, out, _ = merged
    result = run("info", out)
    assert_ok(result)
    with unipack.open(out) as b:
        s = b.summary()
    text = result.output
    assert "ratio" in text and f"{s.ratio:.2f}x" in text
    assert "worst relative error" in text and f"{s.worst_error:.3g}" in text
    for name in s.members:
        assert name.name in text
    for part in s.parts:
        assert part in text


def test_info_tensors_lists_every_tensor(merged) -> None:
    pop, out, _ = merged
    result = run("info", out, "--tensors")
    assert_ok(result)
    with unipack.open(out) as b:
        records = b.manifest.tensors
    assert {t.name for t in records} == set(pop.specs)
    for t in records:
        rows = [line for line in result.output.splitlines() if f" {t.name} " in line and t.storage in line]
        assert rows, t.name
        if t.storage == "shared":
            assert any(f" {t.rank} " in r and t.scheme in r for r in rows), (t.name, rows)


def test_info_json_matches_summary(merged) -> None:
    _, out, _ = merged
    result = run("info", out, "--json")
    assert_ok(result)
    doc = json.loads(result.stdout)
    with unipack.open(out) as b:
        s = b.summary()
        expected = json.loads(json.dumps(s.to_dict()))
    assert doc == expected
    size = out.stat().st_size
    assert doc["file_bytes"] == size
    assert sum(doc["parts"].values()) == size
    assert doc["ratio"] == pytest.approx(doc["input_bytes"] / size)
    assert doc["worst_error"] == max(m["worst_error"] for m in doc["members"])
    assert doc["worst_error"] <= 0.02
    assert [m["name"] for m in doc["members"]] == [m.name for m in s.members]


def test_info_json_with_tensors(merged) -> None:
    _, out, _ = merged
    result = run("info", out, "--json", "--tensors")
    assert_ok(result)
    doc = json.loads(result.stdout)
    with unipack.open(out) as b:
        assert [t["name"] for t in doc["tensors"]] == b.tensor_names
        for t, rec in zip(doc["tensors"], b.manifest.tensors):
            assert (t["storage"], t["scheme"], t["rank"], t["side"]) == (rec.storage, rec.scheme, rec.rank, rec.side)


def test_extract_member(merged, tmp_path: Path) -> None:
    pop, out, _ = merged
    target = tmp_path / "one.safetensors"
    result = run("extract", out, "--member", pop.names[2], "-o", target)
    assert_ok(result)
    assert result.stdout.strip() == str(target)
    got, meta, _ = read_safetensors(target)
    assert meta == pop.metadata[2]
    with unipack.open(out) as b:
        loaded = b.load(pop.names[2])
    assert set(got) == set(loaded)
    for k in got:
        assert bits_equal(got[k], loaded[k]), k
        assert got[k].dtype == pop.tensors[2][k].dtype


def test_extract_member_default_output_name(merged, tmp_path: Path) -> None:
    pop, out, _ = merged
    result = run("extract", out, "-m", pop.names[0], cwd=tmp_path)
    assert_ok(result)
    assert listing(tmp_path) == [f"{pop.names[0]}.safetensors"]


def test_extract_all(merged, tmp_path: Path) -> None:
    pop, out, _ = merged
    target = tmp_path / "all"
    result = run("extract", out, "--all", "-o", target)
    assert_ok(result)
    assert listing(target) == sorted(f"{n}.safetensors" for n in pop.names)
    assert [Path(p).name for p in nonblank_lines(result.stdout)] == [f"{n}.safetensors" for n in pop.names]
    with unipack.open(out) as b:
        for name in pop.names:
            got, meta, _ = read_safetensors(target / f"{name}.safetensors")
            loaded = b.load(name)
            assert all(bits_equal(got[k], loaded[k]) for k in got)
    # a second time without --force is refused; with --force it works
    assert_one_line_error(run("extract", out, "--all", "-o", target))
    assert_ok(run("extract", out, "--all", "-o", target, "--force"))


def test_cli_merge_equals_api_merge(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", standard_specs(), n=3, seed=5)
    opts = dict(
        rank=2, scheme="rows", dtype="float16", codec="none", raw=("step", "mask*"), zstd_level=5, gram_limit=100
    )
    unipack.merge(pop.paths, tmp_path / "api.upk", **opts)
    result = run(
        "merge",
        *pop.paths,
        "-o",
        tmp_path / "cli.upk",
        "--rank",
        "2",
        "--scheme",
        "rows",
        "--dtype",
        "float16",
        "--codec",
        "none",
        "--raw",
        "step",
        "--raw",
        "mask*",
        "--zstd-level",
        "5",
        "--gram-limit",
        "100",
        "-q",
    )
    assert_ok(result)
    assert (tmp_path / "cli.upk").read_bytes() == (tmp_path / "api.upk").read_bytes()
    with unipack.open(tmp_path / "cli.upk") as b:
        assert b.manifest.options["raw"] == ["step", "mask*"]
        assert b.manifest.options["rank"] == 2 and b.manifest.options["max_error"] is None


def test_cli_raw_mismatched_and_energy(tmp_path: Path) -> None:
    from conftest import TensorSpec

    specs = dict(small_specs())
    specs["head"] = TensorSpec((2, 8), kind="head")
    pop = write_population(tmp_path / "in", specs, n=3)
    out = tmp_path / "x.upk"
    assert "--strict-shapes" in assert_one_line_error(run("merge", *pop.paths, "-o", out, "--strict-shapes", "-q"))
    assert not out.exists()
    assert_ok(run("merge", *pop.paths, "-o", out, "--raw-mismatched", "--energy", "0.9", "-q"))
    with unipack.open(out) as b:
        assert {t.name: t.storage for t in b.manifest.tensors}["head"] == "raw"
        assert b.manifest.options["energy"] == 0.9


def test_version() -> None:
    result = run("--version")
    assert_ok(result)
    assert unipack.__version__ in result.output


# ------------------------------------------------------------------------------------------
# bad input through the CLI: exit 1, one line "Error: ...", nothing left behind
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_BAD_CASES)
def test_bad_input_one_line_error(tmp_path: Path, kind: str) -> None:
    case = bad_case(kind, tmp_path)
    assert case.cli_args is not None
    before = listing(case.clean_dir) if case.clean_dir else None
    kept = {p: p.read_bytes() for p in case.unchanged}
    result = run(*case.cli_args)
    if case.cli_exit == 1:
        line = assert_one_line_error(result)
        for part in case.mentions:
            assert part in line, (part, line)
    else:  # a usage error (click's own checks): exit 2 and an "Error:" naming the bad value
        assert result.exit_code == 2, result.output
        assert isinstance(result.exception, SystemExit)
        assert "Error:" in result.output and "Traceback" not in result.output
        assert any(part in result.output for part in case.mentions)
    for p, data in kept.items():
        assert p.read_bytes() == data
    if before is not None:
        assert listing(case.clean_dir) == before


@pytest.mark.parametrize("kind", ["missing_input", "names_differ", "output_exists", "rank_and_energy"])
def test_merge_error_same_with_and_without_quiet(tmp_path: Path, kind: str) -> None:
    case = bad_case(kind, tmp_path)
    assert case.cli_args is not None
    loud = assert_one_line_error(run(*case.cli_args))
    quiet = assert_one_line_error(run(*case.cli_args, "-q"))
    assert loud == quiet


@pytest.mark.parametrize("quiet", [True, False])
def test_error_output_is_exactly_one_line(tmp_path: Path, quiet: bool) -> None:
    """README: "Errors are one line (`Error: what, where, what to do`)": nothing else on stderr."""
    case = bad_case("missing_input", tmp_path)
    assert case.cli_args is not None
    result = run(*case.cli_args, *(["-q"] if quiet else []))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, repr(result.stderr)


def test_non_finite_input_is_not_an_internal_error(tmp_path: Path) -> None:
    """A NaN in a checkpoint is the user's data, not a unipack bug: exit 0 or a one-line exit 1."""
    from safetensors.torch import save_file

    pop = write_population(tmp_path / "in", small_specs(), n=3)
    t = dict(pop.tensors[1])
    t["a.weight"] = t["a.weight"].clone()
    t["a.weight"][0, 0] = float("nan")
    save_file(t, str(pop.paths[1]))
    result = run("merge", *pop.paths, "-o", tmp_path / "x.upk", "-q")
    if result.exit_code != 0:
        line = assert_one_line_error(result)
        assert "a.weight" in line


# ------------------------------------------------------------------------------------------
# usage errors: exit 2
# ------------------------------------------------------------------------------------------


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    pop, bundle = make_bundle(tmp_path)
    cases = [
        ["extract", str(bundle)],  # neither --member nor --all
        ["extract", str(bundle), "--member", pop.names[0], "--all", "-o", str(tmp_path / "d")],  # both
        ["merge", *map(str, pop.paths)],  # no -o
        ["merge", "-o", str(tmp_path / "y.upk")],  # no inputs
        ["merge", *map(str, pop.paths), "-o", str(tmp_path / "y.upk"), "--rank", "two"],
        ["merge", *map(str, pop.paths), "-o", str(tmp_path / "y.upk"), "--codec", "gzip"],
        ["info"],
        ["frobnicate"],
    ]
    for args in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Error:" in result.output and "Traceback" not in result.output, args
    assert not (tmp_path / "y.upk").exists()
    assert not (tmp_path / "d").exists()
    result = run("extract", str(bundle))
    assert "--member" in result.output and "--all" in result.output
