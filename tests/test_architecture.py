"""The shape of the house: service → worker → mergeshield, and a library free of front ends."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_library_modules_stay_small() -> None:
    """style.md: files under ~300 lines, split by concept."""
    long = {p.relative_to(ROOT).as_posix(): n for p in (ROOT / "mergeshield").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
