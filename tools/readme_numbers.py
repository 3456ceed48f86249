#!/usr/bin/env python
"""The README's demo figures, from one command: run ``unipack demo --json`` and write (or check)
the paragraph of README.md between the markers ``<!-- readme_numbers:demo -->`` and
``<!-- /readme_numbers:demo -->``.

    python tools/readme_numbers.py --check     # exit 1 if README.md's paragraph differs
    python tools/readme_numbers.py --update    # rewrite it from this machine's run
    python tools/readme_numbers.py --figures F # reuse a `unipack demo --json F` run

Only the paragraph between the markers is generated, every figure in it from the demo's own
JSON (the numbers its terminal output shows, formatted the same way); the rate-distortion tables
come from ``tools/bench_rd.py``, quoted with their command. A release reruns this on the
project's machine kind (2 CPU cores) and commits the result.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from unipack.render.tables import format_bytes as size  # as the CLI prints sizes

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- readme_numbers:demo -->", "<!-- /readme_numbers:demo -->"
CLI = "from unipack.cli import main; main()"


def _decade(x: float) -> str:
    """The power of ten above ``x``: the ONNX check's inputs are random, its last digits vary."""
    return f"1e{math.ceil(math.log10(x)) if x > 0 else -16}"


def paragraph(f: dict[str, Any]) -> str:
    parts = f["parts"]
    share = {k: 100 * v / f["file_bytes"] for k, v in parts.items()}
    held = f["held_out"]
    sweep = ", ".join(
        f"`{row['options']}` {row['ratio']:.2f}x (largest drop {row['worst_drop']:.2f})" for row in f["sweep"]
    )
    lines = [
        f"**The demo** (`unipack demo`; {f['members']} full fine-tunes of a 136k-parameter ViT on UCI digits, "
        f"heads stored raw, the default rule): {size(f['input_bytes'])} → {size(f['file_bytes'])}, "
        f"**{f['ratio']:.2f}x**"
        + (
            f" ({f['ratio_vs_lossless']:.2f}x against the inputs compressed losslessly, "
            f"{f.get('lossless_how', 'zstd -19')}: {size(f['lossless_bytes'])})"
            if f.get("ratio_vs_lossless")
            else ""
        )
        + f", worst relative error {f['worst_error']:.3g} on any tensor of any member; largest accuracy "
        f"drop {f['worst_drop']:.2f} points, mean {f['mean_drop']:.2f}, where the mean alone loses up to "
        f"{f['mean_only_worst_drop']:.2f} points.",
        f"The bytes: deltas {size(parts['deltas'])} ({share['deltas']:.0f}%), means {size(parts['means'])} "
        f"({share['means']:.0f}%), manifest {size(parts['manifest'])} ({share['manifest']:.0f}%), heads "
        f"{size(parts['raw'])}.",
    ]
    alts = f.get("alternatives")
    if alts:
        best = f.get("smallest_met")
        lines.append(
            "What a user would store instead, measured by the merge: fp16 cast "
            f"{alts['fp16']['ratio']:.2f}x, mean + int8 deltas {alts['int8']['ratio']:.2f}x, int4 "
            f"{alts['int4']['ratio']:.2f}x, int2 {alts['int2']['ratio']:.2f}x, 1-bit {alts['1-bit']['ratio']:.2f}x, "
            f"the paper's k = 16 {alts['paper-k16']['ratio']:.2f}x"
            + (
                f"; the smallest that meets the merge's rule on every tensor is {best} "
                f"({alts[best]['ratio']:.2f}x): the bundle is {f['ratio'] / alts[best]['ratio']:.2f}x smaller."
                if best
                else "; none meets the rule on every tensor."
            )
        )
    lines.append(
        f"A member held out of the merge and added later with `unipack add` costs {size(held['bytes_added'])} "
        f"and scores {held['drop']:+.2f} points against its original. Other budgets: {sweep}. "
        f"The ONNX export of a member matches torch to below {_decade(f['onnx_max_abs'])} "
        "(largest absolute difference)."
    )
    return "\n".join(lines)


def run_demo(out: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from unipack.cli import main; main()",
                "demo",
                "--workdir",
                work,
                "--json",
                str(out),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md's demo paragraph differs")
    mode.add_argument("--update", action="store_true", help="rewrite README.md's demo paragraph")
    p.add_argument("--figures", type=Path, help="a `unipack demo --json` file to use instead of running the demo")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args()
    figures_path = args.figures
    if figures_path is None:
        figures_path = Path(tempfile.mkdtemp()) / "figures.json"
        run_demo(figures_path)
    text = paragraph(json.loads(figures_path.read_text()))
    if not (args.check or args.update):
        print(text)
        return 0
    readme = args.readme.read_text()
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        print(f"{args.readme}: needs exactly one {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    head, rest = readme.split(BEGIN)
    current, tail = rest.split(END)
    if args.check:
        if current.strip() == text:
            print(f"{args.readme}: the demo paragraph matches this run")
            return 0
        print(f"{args.readme}: the demo paragraph differs from this run; the run gives:\n\n{text}", file=sys.stderr)
        return 1
    args.readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"{args.readme}: demo paragraph updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
