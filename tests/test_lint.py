"""The code stays formatted and lint-clean (ruff: pycodestyle, pyflakes, isort; settings in
pyproject.toml), so style cannot drift between contributors."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["onestep", "tools", "tests"]


def _ruff(*args):
    try:
        from ruff.__main__ import find_ruff_bin
    except ImportError:  # pragma: no cover - ruff is in the dev extra
        raise AssertionError("ruff is not installed: pip install -e '.[dev]'") from None
    return subprocess.run([find_ruff_bin(), *args, *PATHS], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check_is_clean():
    out = _ruff("check", "--no-cache")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_format_is_clean():
    out = _ruff("format", "--check", "--no-cache")
    assert out.returncode == 0, "run `ruff format onestep tools tests`:\n" + out.stdout[-4000:] + out.stderr[-2000:]
