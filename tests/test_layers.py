"""The package's import graph: layers bottom to top, imports only downward, no cycles.

Every ``import`` / ``from ... import`` of an onestep module anywhere in a file (function-level ones
included) is an edge. A module may import modules of its own package and of lower layers; two
packages of the same layer must not import each other; and no set of modules may import each other
in a circle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "onestep"

# Bottom to top. A module belongs to the entry with the longest matching prefix.
LAYERS = [
    ["onestep.registry"],
    ["onestep.utils"],
    ["onestep.config"],
    ["onestep.backbones", "onestep.data"],
    ["onestep.objectives", "onestep.regularizers"],
    ["onestep.sampling", "onestep.viz"],
    ["onestep.build"],
    ["onestep.formats"],
    ["onestep.eval"],
    ["onestep.loggers"],
    ["onestep.train"],
    ["onestep.report", "onestep.api"],
    ["onestep.suite"],
    ["onestep.cli"],
    ["onestep.__main__"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def unit(module: str) -> tuple[int, str]:
    """(layer index, package) of a module."""
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (i, prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer of tests/test_layers.py; add it")
    return best


def named_imports(path: Path, module: str | None):
    """(line, target module, names) of every onestep import in a file, function-level ones included;
    relative imports are resolved against ``module`` (skipped where it is None: files outside the package)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "onestep":
                    yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    continue
                is_pkg = path.name == "__init__.py"
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "onestep":
                yield node.lineno, target, [a.name for a in node.names]


def imports_of(module: str) -> set[str]:
    found = set()
    for _, target, names in named_imports(MODULES[module], module):
        # `from pkg import sub` imports the submodule pkg.sub when there is one.
        subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}
        found |= subs or {target}
    return {m for m in found if m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        if m != "onestep":
            unit(m)


def test_imports_only_go_down():
    bad = []
    for m, deps in GRAPH.items():
        if m == "onestep":  # the package root re-exports the public API from the top
            continue
        layer, package = unit(m)
        for d in deps:
            if d == "onestep":
                bad.append(f"{m} imports the package root 'onestep' (import the module that defines the name)")
                continue
            d_layer, d_package = unit(d)
            if d_layer > layer:
                bad.append(f"{m} (layer {layer}) imports {d} (layer {d_layer}): upward")
            elif d_layer == layer and d_package != package:
                bad.append(f"{m} imports {d}: sibling packages of layer {layer}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    # Tarjan's strongly connected components over the module graph.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_catches_what_it_should():
    """The rules fire on made-up edges (so a passing run means something)."""
    assert unit("onestep.objectives.meanflow")[0] > unit("onestep.backbones.dit")[0]
    assert unit("onestep.train.loop")[0] > unit("onestep.eval.evaluate")[0]
    with pytest.raises(AssertionError, match="no layer"):
        unit("onestep.nowhere")


def test_every_onestep_import_resolves():
    """A function-level import of a moved or renamed module fails only when that path runs (the GPU
    check's distributed part once did, on CI only); here every one is checked statically."""
    import importlib

    files = [(p, module_name(p)) for p in ROOT.rglob("*.py")]
    files += [(p, None) for d in ("tools", "tests") for p in (ROOT.parent / d).rglob("*.py")]
    bad = []
    for path, module in files:
        for line, target, names in named_imports(path, module):
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            if target not in MODULES:
                bad.append(f"{where}: no module {target}")
                continue
            mod = importlib.import_module(target)
            for name in names:
                if name != "*" and f"{target}.{name}" not in MODULES and not hasattr(mod, name):
                    bad.append(f"{where}: {target} has no {name}")
    assert not bad, "\n".join(bad)
