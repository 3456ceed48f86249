"""``unipack report --png``: the picture is a real PNG, shows the right numbers, and degrades well."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread  # matplotlib is in the `test` extra

from unipack.errors import UnipackError
from unipack.render.plots import render_figure, write_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tensor(
    name: str,
    storage: str = "shared",
    *,
    spectrum: list[float] | None = None,
    variance: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    stored_bytes: int = 1000,
) -> dict[str, Any]:
    return {
        "name": name,
        "storage": storage,
        "scheme": "rows" if storage == "shared" else None,
        "rank": rank,
        "energy": energy,
        "spectrum": spectrum or [],
        "variance": variance,
        "stored_bytes": stored_bytes,
    }


def member(
    name: str, worst: float, mean: float | None = 0.1, svd: float | None = 0.01, added: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "added": added,
        "worst_error": worst,
        "mean_error": worst / 2,
        "baselines": {
            "mean": None if mean is None else {"worst_error": mean, "mean_error": mean / 2},
            "svd": None if svd is None else {"worst_error": svd, "mean_error": svd / 2},
        },
    }


@pytest.fixture
def report() -> dict[str, Any]:
    return {
        "path": "bundle.upk",
        "tensors": [
            # spectrum 3, 1 out of a total variance of 5: curve 0, 0.6, 0.8 (truncated head)
            tensor(
                "encoder.layer.0.attention.query.weight",
                spectrum=[3.0, 1.0],
                variance=5.0,
                rank=1,
                energy=0.6,
                stored_bytes=2_000_000,
            ),
            tensor(
                "encoder.layer.0.attention.key.weight",
                spectrum=[2.0, 1.0, 1.0],
                variance=4.0,
                rank=2,
                energy=0.75,
                stored_bytes=500_000,
            ),
            tensor("embeddings.LayerNorm.bias", "raw", stored_bytes=3000),
            tensor("classifier.weight", "exact", stored_bytes=9000),
        ],
        "members": [member("pets", 0.002), member("cars", 0.004), member("new", 0.003, svd=None, added=True)],
    }


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert 10_000 < len(data) < 5_000_000, len(data)
    height, width = imread(path).shape[:2]
    assert (width, height) == (1600, 1000)


def texts(ax: Any) -> list[str]:
    return [t.get_text() for t in ax.texts]


def tick_labels(ax: Any) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


# ------------------------------------------------------------------------------------------
# the file
# ------------------------------------------------------------------------------------------


def test_writes_a_1600_by_1000_png(tmp_path: Path, report: dict[str, Any]) -> None:
    out = tmp_path / "report.png"
    assert write_png(report, out) == out
    check_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temp file left beside it


def test_overwrites_an_existing_file(tmp_path: Path, report: dict[str, Any]) -> None:
    out = tmp_path / "report.png"
    out.write_bytes(b"old")
    write_png(report, str(out))
    check_png(out)


def test_missing_directories_are_created(tmp_path: Path, report: dict[str, Any]) -> None:
    out = tmp_path / "no" / "such" / "report.png"
    write_png(report, out)
    check_png(out)


def test_a_file_in_the_way_of_the_directory_is_a_unipack_error(tmp_path: Path, report: dict[str, Any]) -> None:
    (tmp_path / "no").write_bytes(b"a file")
    with pytest.raises(UnipackError, match="cannot create directory"):
        write_png(report, tmp_path / "no" / "report.png")
    assert (tmp_path / "no").read_bytes() == b"a file"


def test_failed_render_leaves_no_file(tmp_path: Path, report: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", broken)
    with pytest.raises(RuntimeError):
        write_png(report, tmp_path / "report.png")
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib(tmp_path: Path, report: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes every `import matplotlib...` fail, cached submodules included.
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "report.png"
    with pytest.raises(UnipackError) as info:
        write_png(report, out)
    assert str(info.value) == "--png needs matplotlib: pip install 'unipack[plots]'"
    assert not out.exists()


def test_report_that_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(UnipackError) as info:
        write_png([1, 2], tmp_path / "x.png")  # type: ignore[arg-type]
    assert str(info.value) == "--png: the report is a list, expected the object that `unipack report --json` prints"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# what is drawn
# ------------------------------------------------------------------------------------------


def test_title_names_the_bundle(report: dict[str, Any]) -> None:
    fig = render_figure(report)
    assert fig.get_suptitle() == "unipack report: bundle.upk  (4 tensors, 3 members)"


def test_explained_variance_curves_and_chosen_ranks(report: dict[str, Any]) -> None:
    top = render_figure(report).axes[0]
    lines = {line.get_label().split(" (")[0]: line for line in top.get_lines()}
    assert set(lines) == {"encoder.layer.0.attention.query.weight", "encoder.layer.0.attention.key.weight"}
    query = lines["encoder.layer.0.attention.query.weight"]
    assert list(query.get_xdata()) == [0, 1, 2]
    assert list(query.get_ydata()) == pytest.approx([0.0, 0.6, 0.8])  # cumsum / variance, not / sum
    assert list(lines["encoder.layer.0.attention.key.weight"].get_ydata()) == pytest.approx([0, 0.5, 0.75, 1.0])
    assert query.get_label() == "encoder.layer.0.attention.query.weight (2.0 MB)"
    dots = sorted(tuple(map(float, p)) for c in top.collections for p in c.get_offsets())
    assert dots == [(1.0, 0.6), (2.0, 0.75)]  # (chosen rank, energy kept) per shared tensor
    assert top.get_ylim() == (0.0, 1.02)


def test_only_the_largest_tensors_are_labelled() -> None:
    tensors = [
        tensor(f"t{i}", spectrum=[2.0, 1.0], variance=3.0, rank=1, energy=2 / 3, stored_bytes=i) for i in range(30)
    ]
    top = render_figure({"tensors": tensors, "members": []}).axes[0]
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert legend[0] == "other tensors (22)"
    assert [t.split(" (")[0] for t in legend[1:]] == [f"t{i}" for i in range(29, 21, -1)]
    assert len(top.get_lines()) == 30


def test_error_bars_against_baselines(report: dict[str, Any]) -> None:
    bottom = render_figure(report).axes[1]
    assert bottom.get_yscale() == "log"
    legend = [t.get_text() for t in bottom.get_legend().get_texts()]
    assert legend == ["unipack", "mean only", "per-member SVD (equal bytes)", "added after the merge"]
    assert tick_labels(bottom) == ["pets", "cars", "new (added)"]
    heights = sorted(round(p.get_height(), 6) for p in bottom.patches)
    assert heights == [0.002, 0.003, 0.004, 0.01, 0.01, 0.1, 0.1, 0.1]  # no SVD bar for "new"
    hatched = [p for p in bottom.patches if p.get_hatch()]
    assert [round(p.get_height(), 6) for p in hatched] == [0.003]  # the added member's own bar


# ------------------------------------------------------------------------------------------
# degenerate reports still render
# ------------------------------------------------------------------------------------------


def test_no_shared_tensors_and_no_parameter_counts(tmp_path: Path, report: dict[str, Any]) -> None:
    report["tensors"] = [t for t in report["tensors"] if t["storage"] != "shared"]
    assert texts(render_figure(report).axes[0]) == [
        "no parameter counts recorded (a LoRA bundle, or a report of an older unipack)"
    ]
    write_png(report, tmp_path / "r.png")
    check_png(tmp_path / "r.png")


def test_without_shared_tensors_panel_a_is_the_bit_allocation(tmp_path: Path) -> None:
    """A delta bundle: each tensor at 8 x stored bytes / parameters, by storage, the cheapest
    alternative hollow beside it, and the fp16 line."""
    rows = [
        ("a.weight", "delta", 3000, 8000, 4000),  # 3 bits; its alternative 4 bits
        ("a.bias", "delta", 100, 400, None),  # 2 bits, no alternative meets the rule
        ("head.weight", "raw", 4000, 1000, None),  # 32 bits
        ("b.weight", "delta", 500, 1000, 1000),  # 4 bits; alternative 8 bits
    ]
    tensors = []
    for name, storage, stored, parameters, alternative in rows:
        t = tensor(name, storage, stored_bytes=stored)
        t.update(parameters=parameters, alternative_bytes=alternative)
        tensors.append(t)
    tensors.append(tensor("lora.module", "lora"))  # no parameter count: left out
    ax = render_figure({"tensors": tensors, "members": []}).axes[0]
    assert ax.get_title(loc="left").startswith("(a) bit allocation")
    drawn = {c.get_label(): [tuple(xy) for xy in c.get_offsets()] for c in ax.collections}
    assert drawn["delta (3)"] == [(0, 3.0), (1, 2.0), (3, 4.0)]
    assert drawn["raw (1)"] == [(2, 32.0)]
    assert drawn["cheapest alternative meeting the rule"] == [(0, 4.0), (3, 8.0)]
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [16.0]
    assert ax.get_yscale() == "log"
    write_png({"tensors": tensors, "members": []}, tmp_path / "r.png")
    check_png(tmp_path / "r.png")


def test_shared_tensors_without_spectra(tmp_path: Path) -> None:
    report = {"tensors": [tensor("a"), tensor("b", spectrum=[0.0, 0.0], variance=0.0)], "members": []}
    fig = render_figure(report)
    assert texts(fig.axes[0]) == ["no spectrum recorded for the 2 shared tensors"]
    assert texts(fig.axes[1]) == ["no members"]
    write_png(report, tmp_path / "r.png")
    check_png(tmp_path / "r.png")


def test_empty_report(tmp_path: Path) -> None:
    fig = render_figure({})
    assert fig.get_suptitle() == "unipack report: ?  (0 tensors, 0 members)"
    write_png({}, tmp_path / "r.png")
    check_png(tmp_path / "r.png")


def test_no_baselines(tmp_path: Path, report: dict[str, Any]) -> None:
    report["members"] = [member("pets", 0.002, mean=None, svd=None), {"name": "cars", "worst_error": 0.01}]
    bottom = render_figure(report).axes[1]
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == ["unipack"]
    assert sorted(round(p.get_height(), 6) for p in bottom.patches) == [0.002, 0.01]
    write_png(report, tmp_path / "r.png")
    check_png(tmp_path / "r.png")


def test_zero_errors_are_drawn_at_a_floor(tmp_path: Path, report: dict[str, Any]) -> None:
    report["members"] = [member("exact", 0.0, mean=0.0, svd=0.0), member("lossy", 0.001)]
    bottom = render_figure(report).axes[1]
    assert texts(bottom) == ["error 0 (exact) drawn at 1e-04: a log scale has no 0"]
    assert min(p.get_height() for p in bottom.patches) == pytest.approx(1e-4)
    assert 0 < bottom.get_ylim()[0] < 1e-4


def test_all_errors_zero(tmp_path: Path, report: dict[str, Any]) -> None:
    report["members"] = [member("a", 0.0, mean=0.0, svd=0.0), member("b", 0.0, mean=None, svd=None)]
    bottom = render_figure(report).axes[1]
    assert texts(bottom) == ["error 0 (exact) drawn at 1e-09: a log scale has no 0"]
    write_png(report, tmp_path / "r.png")
    check_png(tmp_path / "r.png")


def test_three_hundred_members_thin_out_the_names(tmp_path: Path, report: dict[str, Any]) -> None:
    report["members"] = [member(f"member-{i:03d}", 0.001 * (1 + i % 7), added=i >= 295) for i in range(300)]
    bottom = render_figure(report).axes[1]
    labels = tick_labels(bottom)
    assert len(labels) == 38 and labels[:2] == ["member-000", "member-008"]  # one name every 8
    assert labels[-1] == "member-296 (added)"
    assert bottom.get_xlabel() == "member (300 in all; one name every 8)"
    assert len(bottom.patches) == 900
    write_png(report, tmp_path / "r.png")
    check_png(tmp_path / "r.png")


def test_junk_values_are_skipped_not_fatal(tmp_path: Path, report: dict[str, Any]) -> None:
    report["tensors"].append(tensor("weird", spectrum=["x", None, float("nan"), 1.0], variance="?", rank=None))
    report["tensors"].append("not an object")
    report["members"].append({"name": "nan", "worst_error": float("nan"), "baselines": "none"})
    write_png(report, tmp_path / "r.png")
    check_png(tmp_path / "r.png")


def test_rate_panel_draws_the_bundle_and_every_alternative(tmp_path: Path) -> None:
    report = {
        "bytes": {"file": 1000},
        "alternatives": {
            "tensors": 3,
            "rule": "the merge's error rule",
            "bundle_errors": [0.01, 0.02],
            "rows": [
                {"method": "fp16", "label": "fp16 cast", "bytes": 4000, "tensors_met": 3, "errors": [1e-4, 2e-4]},
                {"method": "1-bit", "label": "1-bit", "bytes": 500, "tensors_met": 1, "errors": [0.05, 0.07]},
            ],
        },
    }
    rate = render_figure(report).axes[2]
    points = {c.get_label(): c.get_offsets()[0].tolist() for c in rate.collections}
    assert points == {
        "this bundle": [1000.0, pytest.approx(0.015)],
        "fp16 cast": [4000.0, pytest.approx(1.5e-4)],
        "1-bit (misses the rule)": [500.0, pytest.approx(0.06)],
    }
    assert rate.get_xscale() == "log" and rate.get_yscale() == "log"
    assert texts(render_figure({"bytes": {"file": 10}}).axes[2]) == [
        "no alternatives recorded (merged with --no-baselines, or members added since)"
    ]
