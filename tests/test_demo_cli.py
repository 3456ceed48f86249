"""The README's main command, end to end on the small demo population."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from unipack.cli import cli
from unipack.demo.run import SWEEP


def test_demo_runs_end_to_end_and_reports_accuracy(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    result = CliRunner().invoke(
        cli,
        [
            "demo",
            "--small",
            "--workdir",
            str(tmp_path / "w"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(figures_path),
        ],
    )
    assert result.exit_code == 0, result.output
    # --json: the figures the README quotes, consistent with the files the demo wrote
    figures = json.loads(figures_path.read_text())
    bundle = tmp_path / "w" / "demo.upk"
    assert figures["file_bytes"] == bundle.stat().st_size == sum(figures["parts"].values())
    assert figures["ratio"] == pytest.approx(figures["input_bytes"] / figures["file_bytes"])
    assert f"{figures['ratio']:.2f}x" in result.output
    assert [row["options"] for row in figures["sweep"]] == [label for label, _ in SWEEP]
    assert figures["held_out"]["bytes_added"] > 0 and figures["onnx_max_abs"] < 1e-3
    out = result.output
    assert "held-out accuracy" in out and "mean only" in out and "other budgets" in out
    assert "largest accuracy drop" in out
    assert (tmp_path / "w" / "demo.upk").is_file()
    extracted = sorted((tmp_path / "w" / "members").glob("*.safetensors"))
    assert len(extracted) >= 2


def test_demo_prints_the_report_accuracy_table_and_it_is_right(tmp_path: Path) -> None:
    """The issue's "done means": the demo's report shows originals vs unipack vs mean only, and
    the numbers are the demo eval's own scores of the originals and of the extracted members."""
    import json

    from safetensors.torch import load_file

    from unipack.demo import evaluate

    cache = tmp_path / "cache"
    result = CliRunner().invoke(cli, ["demo", "--small", "--workdir", str(tmp_path / "w"), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "accuracy by member (unipack.demo.evaluate:evaluate)" in out
    for column in ("original", "unipack", "mean only", "per-member SVD (equal bytes)"):
        assert column in out
    assert "bytes by part" in out and "baselines" in out and "add summary" in out
    assert "ONNX Runtime CPUExecutionProvider vs torch" in out and "PASS: max abs diff" in out
    assert len(list((tmp_path / "w").glob("*.onnx"))) == 1
    originals = next(p.parent for p in cache.rglob("*.safetensors") if p.parent.name != "base")
    report = CliRunner().invoke(
        cli,
        [
            "report",
            str(tmp_path / "w" / "demo.upk"),
            "--json",
            "--eval",
            "unipack.demo.evaluate:evaluate",
            "--originals",
            str(originals),
        ],
    )
    assert report.exit_code == 0, report.output
    doc = json.loads(report.stdout)
    scores = doc["evaluation"]["members"]
    assert doc["evaluation"]["metric"] == "accuracy"
    for path in sorted((tmp_path / "w" / "members").glob("*.safetensors")):
        name = path.stem
        assert scores[name]["unipack"]["accuracy"] == evaluate(load_file(str(path)), name)["accuracy"]
        original = evaluate(load_file(str(originals / path.name)), name)["accuracy"]
        assert scores[name]["original"]["accuracy"] == original
        # the drop shown in the table is the difference of those two numbers
        assert f"({scores[name]['unipack']['accuracy'] - original:+.3g})" in out
