"""CI runs the README's two fresh-machine commands as the README writes them (.ci/readme-command)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _command(n):
    return subprocess.run(["bash", str(ROOT / ".ci" / "readme-command"), str(n)], capture_output=True, text=True)


def test_ci_reads_both_fresh_machine_commands_from_the_readme():
    first, tests = _command(1), _command(2)
    assert first.returncode == 0 and tests.returncode == 0
    # One line each, the ones the README shows under "Fresh machine".
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Fresh machine", 1)[1].split("\n## ", 1)[0]
    assert first.stdout.strip() in section and tests.stdout.strip() in section
    assert first.stdout.count("\n") == 1 and tests.stdout.count("\n") == 1
    assert first.stdout.startswith("pip install -e . && onestep train ") and "recipes/" in first.stdout
    assert tests.stdout.startswith('pip install -e ".[dev]"') and "pytest" in tests.stdout
    recipe = next(w for w in first.stdout.split() if w.startswith("recipes/"))
    assert (ROOT / recipe).is_file()
    missing = _command(3)
    assert missing.returncode == 2 and missing.stdout == "" and missing.stderr.count("\n") == 1
    run = (ROOT / ".ci" / "run").read_text()
    assert ".ci/readme-command 1" in run and ".ci/readme-command 2" in run
