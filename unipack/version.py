"""unipack's version, and where a running copy comes from (for benchmark records)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def revision() -> dict[str, Any]:
    """The version, and the git commit (with a dirty flag) when unipack runs from a checkout."""
    info: dict[str, Any] = {"version": __version__}
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        info.update(commit=head, dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return info
