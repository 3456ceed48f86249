"""A newcomer's first hour (issue 15, items 3, 6 and 7): ``extract`` without ``-o`` never replaces
an original; ``info`` and ``report`` split a bundle's bytes the same way; results go to stdout and
progress and diagnostics to stderr; every command that prints a result takes ``--json``;
``unipack --help`` shows every command's whole description; and the report the demo prints is
short, never cuts a tensor name into another's, and prints float noise around zero as 0."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest
from click.testing import Result
from conftest import (
    TensorSpec,
    bits_equal,
    blob_range,
    flip_byte,
    read_safetensors,
    rel_error,
    run,
    small_specs,
    write_population,
)
from rich.console import Console
from rich.table import Table

import unipack
from unipack.analysis.report import Report, report
from unipack.analysis.scoring import drops
from unipack.cli import cli
from unipack.render.console import format_bytes, info_table
from unipack.render.report_view import compact_report_view, report_view
from unipack.render.tables import FittedTable

HEAD = "classifier.weight"


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def heads_specs() -> dict[str, TensorSpec]:
    """Fine-tunes of one base with task heads of different sizes (the demo's shape of population)."""
    return {**small_specs(), HEAD: TensorSpec((3, 12), kind="head")}


# ------------------------------------------------------------------------------------------
# item 3: extract without -o never touches one of the bundle's sources
# ------------------------------------------------------------------------------------------


@pytest.fixture
def beside_sources(tmp_path: Path):
    """The issue's set-up: the bundle merged in the folder that holds the originals."""
    ckpts = tmp_path / "ckpts"
    pop = write_population(ckpts, heads_specs(), n=3)
    ok(run("merge", *[p.name for p in pop.paths], "-o", "b.upk", cwd=ckpts))
    return pop, ckpts


@pytest.mark.parametrize(
    "args, hint",
    [
        (["--member", "ft0"], "-o FILE"),
        (["--member", "ft0", "--force"], "-o FILE"),
        (["--all"], "-o DIR"),
        (["--all", "--force"], "-o DIR"),
    ],
)
def test_extract_without_o_beside_the_sources_never_touches_them(beside_sources, args: list[str], hint: str) -> None:
    pop, ckpts = beside_sources
    before = digests(ckpts)
    line = one_line_error(run("extract", "b.upk", *args, cwd=ckpts))
    assert line.startswith("Error: ft0.safetensors")
    assert "may be the original that member ft0 was merged from" in line
    assert f"give {hint}" in line and "force=True" not in line
    assert digests(ckpts) == before
    # what the message says to type works, and writes the bundle's member, not over the original
    target = "out/ft0.safetensors" if hint == "-o FILE" else "out"
    result = ok(run("extract", "b.upk", *args, "-o", target, cwd=ckpts))
    written = ckpts / "out" / "ft0.safetensors"
    assert result.stdout.splitlines()[0] == str(Path(target) / "ft0.safetensors" if hint == "-o DIR" else target)
    got, _, _ = read_safetensors(written)
    with unipack.open(ckpts / "b.upk") as b:
        loaded = b.load("ft0")
    assert set(got) == set(loaded) and all(bits_equal(got[k], loaded[k]) for k in got)
    assert any(not bits_equal(got[k], pop.tensors[0][k]) for k in got)  # lossy: not the original's bytes
    assert {k: v for k, v in digests(ckpts).items() if not k.startswith("out/")} == before


def test_extract_without_o_elsewhere_writes_by_member_name_and_never_replaces(beside_sources, tmp_path: Path) -> None:
    pop, ckpts = beside_sources
    here = tmp_path / "elsewhere"
    here.mkdir()
    result = ok(run("extract", ckpts / "b.upk", "--member", "ft1", cwd=here))
    assert result.stdout == "ft1.safetensors\n"
    assert sorted(os.listdir(here)) == ["ft1.safetensors"]
    got, meta, _ = read_safetensors(here / "ft1.safetensors")
    assert meta == pop.metadata[1]
    with unipack.open(ckpts / "b.upk") as b:
        loaded = b.load("ft1")
    assert all(bits_equal(got[k], loaded[k]) for k in got)
    # The second time the default output exists: never replaced without -o, not even with --force.
    before = digests(here)
    line = one_line_error(run("extract", ckpts / "b.upk", "--member", "ft1", "--force", cwd=here))
    assert "without -o, extract never replaces anything" in line
    assert digests(here) == before
    # hf folders: the same rule, and the name of a folder source is recognised too
    ok(run("extract", ckpts / "b.upk", "--member", "ft1", "--format", "hf", cwd=here))
    line = one_line_error(run("extract", ckpts / "b.upk", "--member", "ft1", "--format", "hf", cwd=here))
    assert line.startswith("Error: ft1: already exists") and "give -o DIR" in line


def test_cli_errors_name_flags_never_python_arguments(beside_sources) -> None:
    _, ckpts = beside_sources
    (ckpts / "taken.safetensors").write_bytes(b"mine")
    (ckpts / "taken").mkdir()
    cases = [
        ["extract", "b.upk", "--member", "ft0", "-o", "taken.safetensors"],
        ["extract", "b.upk", "--member", "ft0", "--format", "hf", "-o", "taken"],
        ["merge", "ft0.safetensors", "ft1.safetensors", "-o", "b.upk"],
    ]
    for args in cases:
        line = one_line_error(run(*args, cwd=ckpts))
        assert "already exists" in line and "--force" in line, line
        assert "force=True" not in line, line
    assert (ckpts / "taken.safetensors").read_bytes() == b"mine"


# ------------------------------------------------------------------------------------------
# item 7: one byte split; results on stdout, diagnostics on stderr; --json; help
# ------------------------------------------------------------------------------------------


@pytest.fixture
def bundle(tmp_path: Path):
    pop = write_population(tmp_path / "in", heads_specs(), n=3, seed=4)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out)
    return pop, out


def independent_header_parts(path: Path) -> tuple[dict[str, int], int]:
    """header / manifest / padding read straight from the file, and where the data starts."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    body = data[8 : 8 + length]
    text = json.loads(body)["__metadata__"]["manifest"]
    manifest = len(json.dumps(text, ensure_ascii=False).encode("utf-8"))
    padding = len(body) - len(body.rstrip(b" "))
    return {"header": 8 + length - manifest - padding, "manifest": manifest, "padding": padding}, 8 + length


def table_row(text: str, first_cell: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"│ {first_cell} ")]
    assert len(rows) == 1, (first_cell, rows)
    return rows[0]


def test_info_and_report_split_the_bytes_the_same_way(bundle) -> None:
    _, out = bundle
    size = out.stat().st_size
    info = json.loads(ok(run("info", out, "--json")).stdout)["parts"]
    rep = json.loads(ok(run("report", out, "--json")).stdout)["bytes"]["parts"]
    assert info == rep
    assert sum(info.values()) == size
    expected, data_start = independent_header_parts(out)
    assert {k: info[k] for k in expected} == expected
    assert info["manifest"] > 0 and info["header"] > 0
    assert sum(n for part, n in info.items() if part not in expected) == size - data_start
    # and the two tables print the same rows
    for command in ("info", "report"):
        text = ok(run(command, out)).stdout
        parts_table = text[text.index("bytes by part") : text.index("│ total ")]
        for part, n in info.items():
            assert f" {format_bytes(n)} " in table_row(parts_table, part), (command, part, n)


EVAL = """
    def evaluate(state_dict, member_name):
        return {"acc": 1.0}
"""


def test_results_go_to_stdout_progress_and_diagnostics_to_stderr(bundle, tmp_path: Path) -> None:
    pop, out = bundle
    ev = tmp_path / "ev.py"
    ev.write_text(textwrap.dedent(EVAL), encoding="utf-8")
    merged = tmp_path / "m.upk"
    result = ok(run("merge", *pop.paths, "-o", merged, "--eval", ev, "--max-drop", "1"))
    assert "merge summary" in result.stdout and str(merged) in result.stdout
    assert HEAD in result.stdout  # the task-specific line
    assert result.stderr.startswith("max-error 0.05 and max-delta-error 0.4: ")  # progress: the attempt
    assert "merge summary" not in result.stderr
    result = ok(run("add", out, pop.paths[0], "--name", "again"))
    assert "add summary" in result.stdout and str(out) in result.stdout and result.stderr == ""
    for command in ("info", "report", "verify"):
        result = ok(run(command, out))
        assert result.stdout and result.stderr == "", command
    result = ok(run("extract", out, "--member", "ft0", "-o", tmp_path / "x.safetensors"))
    assert result.stdout == f"{tmp_path / 'x.safetensors'}\n"
    assert result.stderr.startswith("extracted ft0: worst relative error")
    one_line_error(run("info", tmp_path / "missing.upk"))


def test_json_results_parse_and_carry_the_numbers(bundle, tmp_path: Path) -> None:
    pop, _ = bundle
    out = tmp_path / "j.upk"
    result = ok(run("merge", *pop.paths, "-o", out, "--json"))
    assert result.stderr == ""
    doc = json.loads(result.stdout)
    size = out.stat().st_size
    inputs = sum(p.stat().st_size for p in pop.paths)
    assert (doc["path"], doc["file_bytes"], doc["input_bytes"]) == (str(out), size, inputs)
    assert doc["ratio"] == pytest.approx(inputs / size)
    assert doc["members"] == pop.names and doc["task_specific"] == [HEAD]
    # the worst error is the largest relative error of any member's float tensor, measured here
    with unipack.open(out) as b:
        measured = {
            name: max(rel_error(pop.tensors[i][k], b.load(name)[k]) for k in pop.tensors[i] if k != "ids")
            for i, name in enumerate(pop.names)
        }
    assert doc["worst_error"] == pytest.approx(max(measured.values()), rel=1e-5)
    assert doc["worst_member"] == max(measured, key=measured.__getitem__)

    result = ok(run("add", out, pop.paths[2], "--name", "again", "--json"))
    assert result.stderr == ""
    added = json.loads(result.stdout)
    assert added["member"] == "again" and added["path"] == str(out)
    assert (added["file_bytes_before"], added["file_bytes_after"]) == (size, out.stat().st_size)
    assert added["bytes_added"] == out.stat().st_size - size
    assert sorted(o["tensor"] for o in added["outcomes"]) == sorted(pop.tensors[2])
    assert sum(added["tensors"].values()) == len(pop.tensors[2])
    with unipack.open(out) as b:
        assert added["worst_error"] == max(b.manifest.member("again").errors)

    for args in (["info", out, "--json"], ["report", out, "--json"]):
        assert json.loads(ok(run(*args)).stdout)["members"]
    result = ok(run("extract", out, "--member", "ft1", "-o", tmp_path / "ft1.safetensors", "--json"))
    extracted = json.loads(result.stdout)["extracted"]
    with unipack.open(out) as b:
        worst = max(b.manifest.member("ft1").errors)
    assert extracted == [
        {"member": "ft1", "path": str(tmp_path / "ft1.safetensors"), "worst_error": worst, "exact": worst == 0}
    ]
    assert (tmp_path / "ft1.safetensors").is_file()

    verdict = json.loads(ok(run("verify", out, "--json")).stdout)
    assert verdict["ok"] is True and verdict["problems"] == []
    with unipack.open(out) as b:
        assert (verdict["blobs"], verdict["members"]) == (len(b.manifest.blobs), 4)
        blob = next(iter(b.manifest.blobs))
    lo, hi = blob_range(out, blob)
    flip_byte(out, (lo + hi) // 2)
    result = run("verify", out, "--json")
    assert result.exit_code == 1
    verdict = json.loads(result.stdout)
    assert verdict["ok"] is False and any(repr(blob) in p for p in verdict["problems"])


FACTORY = """
    import torch

    def build(state_dict, member_name):
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        return module, torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
"""


def test_export_json_carries_the_onnx_check(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).state_dict()
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"mlp-{i}.safetensors")
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(paths[-1]))
    unipack.merge(paths, tmp_path / "mlp.upk")
    (tmp_path / "factory.py").write_text(textwrap.dedent(FACTORY), encoding="utf-8")
    target = tmp_path / "m.onnx"
    result = ok(
        run("export", "mlp.upk", "--member", "mlp-1", "--onnx", target, "--model", "factory.py", "--json", cwd=tmp_path)
    )
    doc = json.loads(result.stdout)
    assert (doc["member"], doc["path"], doc["passed"], doc["atol"]) == ("mlp-1", str(target), True, 1e-4)
    assert doc["max_abs_diff"] == max(run["max_abs_diff"] for run in doc["runs"]) <= 1e-4
    # the difference it reports is the one ONNX Runtime gives here against the bundle's weights
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with unipack.open(tmp_path / "mlp.upk") as b:
        module.load_state_dict(b.load("mlp-1"))
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        measured = float(np.max(np.abs(got - module(x).numpy())))
    assert measured <= 1e-4 and doc["runs"][0]["max_abs_diff"] == pytest.approx(measured, abs=1e-6)


def test_help_lists_every_command_with_its_whole_description() -> None:
    result = ok(run("--help", columns=80))
    listing = result.output.split("Commands:", 1)[1]
    assert "..." not in listing
    rows = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in listing.splitlines() if line.strip()}
    assert set(rows) == set(cli.commands)
    for name, command in cli.commands.items():
        assert command.short_help, name
        assert rows[name] == command.short_help, (name, rows[name])
    # each command's full help still carries the long description
    assert "Merge same-architecture checkpoints" in ok(run("merge", "--help")).output
    assert "--tensors" in ok(run("demo", "--help")).output


# ------------------------------------------------------------------------------------------
# item 6: the demo's report: compact, names never cut alike, zero prints as 0
# ------------------------------------------------------------------------------------------

PREFIX = "vit.encoder.layer.0.attention.attention."
# Accuracies in points whose drops cancel: their mean is float noise (about -5e-15), not 0.
ORIGINAL = [97.77777777777777, 95.0, 91.11111111111111]
UNIPACK = [97.22222222222223, 95.55555555555556, 91.11111111111111]


@pytest.fixture
def long_named(tmp_path: Path) -> tuple[Report, unipack.Bundle]:
    specs: dict[str, TensorSpec] = {f"{PREFIX}{x}.weight": TensorSpec((16, 16)) for x in ("query", "key", "value")}
    specs.update({f"{PREFIX}{x}.bias": TensorSpec((16,), kind="flat") for x in ("query", "key", "value")})
    specs[HEAD] = TensorSpec((3, 16), kind="head")
    pop = write_population(tmp_path / "in", specs, n=3)
    unipack.merge(pop.paths, tmp_path / "long.upk")
    b = unipack.open(tmp_path / "long.upk")
    table = {
        name: {"original": {"accuracy": o}, "unipack": {"accuracy": u}, "mean-only": None, "svd": None}
        for name, o, u in zip(pop.names, ORIGINAL, UNIPACK)
    }
    evaluation = {"eval": "e:f", "metric": "accuracy", "members": table, "original_recorded": [], "drops": {}}
    evaluation["drops"] = drops(table, "accuracy")
    yield dataclasses.replace(report(b), evaluation=evaluation), b
    b.close()


def render(renderable: object, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def names_by_row(text: str, caption: str = "") -> list[str]:
    """The first cell of every row of a rendered table, or the name line of every record where the
    table printed as records (too narrow a terminal). In a table a row starts where its second
    column has text: a long name wraps onto lines whose other cells are empty."""
    if "┏" not in text:
        # the caption may wrap: any line that is a piece of it is not a record's name line
        return [
            line
            for line in text.splitlines()[1:]
            if line.strip() and not (caption and line.strip() in caption) and line[0] != " "
        ]
    rows: list[str] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = line.split("│")[1:-1]
        if cells[1].strip() or not rows:
            rows.append("")
        rows[-1] += cells[0].strip()
    return rows


def tables(renderables: Iterable[object]) -> dict[str, Table | FittedTable]:
    """The tables among a view's renderables, by the first word of their title."""
    found = [t for t in renderables if isinstance(t, (Table, FittedTable))]
    return {str(t.title).split(" ")[0].rstrip(":"): t for t in found}


@pytest.mark.parametrize("width", [80, 120, 160])
def test_tensor_names_are_never_cut_so_that_rows_look_alike(long_named, width: int) -> None:
    r, b = long_named
    names = [x.name for x in r.tensors]
    assert len({n[:33] for n in names if n.startswith(PREFIX)}) == 1  # the trap: one cut prefix
    by_bytes = sorted(r.tensors, key=lambda x: x.stored_bytes, reverse=True)[:5]
    with unipack.open(b.path) as again:
        info = tables(info_table(again.summary(), again.manifest))["tensors"]
    views = [
        (tables(report_view(r, manifest=b.manifest, show_tensors=True))["tensors"], names),
        (tables(report_view(r, member="ft0", manifest=b.manifest))["member"], [t.name for t in b.manifest.tensors]),
        (tables(compact_report_view(r))["most"], [x.name for x in by_bytes]),
        (info, [t.name for t in b.manifest.tensors]),
    ]
    for view, expected in views:
        text = render(view, width)
        assert "…" not in text, text
        caption = str(view.table.caption or "") if isinstance(view, FittedTable) else ""
        assert names_by_row(text, caption) == expected, text  # every name whole: no two rows read alike
        assert max(len(line) for line in text.splitlines()) <= width
    if width == 160:  # a wide terminal gets the table itself
        assert "┏" in render(views[0][0], width)


def test_compact_report_is_short_and_zero_prints_as_zero(long_named) -> None:
    r, b = long_named
    assert r.evaluation is not None
    noise = r.evaluation["drops"]["unipack"]["mean"]
    assert noise != 0 and abs(noise) < 1e-12  # the case is real: float noise where the drops cancel
    compact = tables(compact_report_view(r))
    assert set(compact) == {"summary", "most", "accuracy"}  # no per-tensor or per-member weight tables
    text = "".join(render(t, 160) for t in compact_report_view(r))
    assert "e-1" not in text and "-0 " not in text
    largest = max(o - u for o, u in zip(ORIGINAL, UNIPACK))
    assert f"{largest:.3g} / 0 " in table_row(text, "largest / mean drop")
    assert table_row(text, "ft2").split("│")[3].strip() == "91.11 (+0)"
    assert table_row(text, "ft0").split("│")[3].strip() == f"97.22 ({UNIPACK[0] - ORIGINAL[0]:+.3g})"
    # the summary rows carry the numbers of the full report
    summary = render(compact["summary"], 160)
    assert f"{r.bytes.ratio:.2f}x vs the inputs" in summary
    for part, n in r.bytes.parts.items():
        if n:
            assert f"{part} {format_bytes(n)}" in summary, part
    full = "".join(render(t, 160) for t in report_view(r, manifest=b.manifest, show_tensors=True))
    assert len(text.splitlines()) < len(full.splitlines())
