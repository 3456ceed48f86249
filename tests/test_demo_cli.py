"""The README's main command, end to end on the small demo population."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from unipack.cli import cli


def test_demo_runs_end_to_end_and_reports_accuracy(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--small", "--workdir", str(tmp_path / "w"),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "held-out accuracy" in out and "mean only" in out and "other budgets" in out
    assert "largest accuracy drop" in out
    assert (tmp_path / "w" / "demo.upk").is_file()
    extracted = sorted((tmp_path / "w" / "members").glob("*.safetensors"))
    assert len(extracted) >= 2
