"""What CI checks besides the tests: ruff's lint rules (with cyclomatic complexity at most 15), from pyproject.toml.

mypy takes 40-120 s on a 2-core machine without its cache, so it is not run here; run
``mypy`` (the package, strict on the format layer; configured in pyproject.toml) before a merge.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ["vlastore", "tests", "tools"]


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")  # the venv ruff
    if ruff is None:
        pytest.skip("pip install ruff (the [dev] extra)")
    return subprocess.run([ruff, *args, *TREES], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean() -> None:
    result = _ruff("check", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied() -> None:
    result = _ruff("format", "--check")
    assert result.returncode == 0, "run `ruff format vlastore tests tools`:\n" + result.stdout + result.stderr


def test_the_package_ships_its_type_information() -> None:
    assert (ROOT / "vlastore" / "py.typed").is_file()
    assert 'vlastore = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
