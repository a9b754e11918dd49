"""Print a pip constraints file pinning every dependency of onestep (and of the extras ``dev`` pulls
in) to the lower bound of its range in pyproject.toml: the oldest releases the project says it
supports. A dependency without a lower bound is an error (the range must say what is supported)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser from PyPI
    import tomli as tomllib

REQ = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(\[[^\]]*\])?\s*(.*)$")


def requirements(project: dict, extra: str | None, seen: set[str]) -> list[str]:
    deps = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    out = []
    for dep in deps:
        name, extras, spec = REQ.match(dep).groups()
        if name.lower() == project["name"]:
            for e in (extras or "[]")[1:-1].split(","):
                if e.strip() and e.strip() not in seen:
                    seen.add(e.strip())
                    out += requirements(project, e.strip(), seen)
            continue
        out.append(dep)
    return out


def main() -> int:
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    extras = sys.argv[1:] or ["dev"]
    deps = requirements(project, None, set())
    seen: set[str] = set()
    for extra in extras:
        deps += requirements(project, extra, seen)
    pins, missing = {}, []
    for dep in deps:
        name, _, spec = REQ.match(dep).groups()
        exact = re.search(r"==\s*([^,\s;]+)", spec)
        low = re.search(r">=\s*([^,\s;]+)", spec)
        if exact or low:
            pins[name.lower()] = (exact or low).group(1)
        else:
            missing.append(name)
    if missing:
        print(f"no lower bound in pyproject.toml for: {', '.join(missing)}", file=sys.stderr)
        return 2
    print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
