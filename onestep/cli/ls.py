"""``onestep ls``: registered components and recipes."""

from __future__ import annotations

from pathlib import Path

from onestep.registry import ConfigError


def run(args) -> int:
    import fnmatch
    import inspect

    from onestep.config import REPO_RECIPES
    from onestep.registry import REGISTRIES

    kinds = [args.kind] if args.kind else list(REGISTRIES) + ["recipes"]
    for kind in kinds:
        if kind == "recipes":
            found = {}
            for root in (REPO_RECIPES, Path.cwd() / "recipes"):  # ./recipes wins on a name clash
                if root.is_dir():
                    found.update({p.stem: p for p in root.glob("*.yaml")})
            entries = [(n, _recipe_summary(found[n])) for n in sorted(found)]
        else:
            if kind not in REGISTRIES:
                raise ConfigError(f"unknown kind '{kind}'; allowed: {', '.join(list(REGISTRIES) + ['recipes'])}")
            reg = REGISTRIES[kind]
            entries = []
            for n in reg.names():
                if n.startswith("test_") and not args.all:
                    continue  # the tiny variants the tests build
                doc = inspect.getdoc(reg.get(n)) or ""
                doc = doc.splitlines()[0] if doc else ""
                if kind == "backbones":
                    doc = f"{_backbone_summary(reg, n)}  {doc}"
                entries.append((n, doc))
        if args.pattern:
            entries = [e for e in entries if fnmatch.fnmatch(e[0], f"*{args.pattern}*")]
        print(f"{kind}:")
        for n, doc in entries:
            print(f"  {n:<28} {doc}".rstrip())
    return 0


def _recipe_summary(path: Path) -> str:
    """The recipe's first comment line (what it trains and where it runs)."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("# ").rstrip()
        if line:
            break
    return ""


def _backbone_summary(reg, name: str) -> str:
    """Blocks, default encoder blocks and parameters at the factory's default input (built on 'meta')."""
    import torch

    try:
        with torch.device("meta"):
            net = reg.build(name)
    except Exception:  # a factory without defaults for every argument
        return ""
    params = sum(p.numel() for p in net.parameters())
    return f"blocks={net.num_blocks:<3} encoder={list(net.encoder_blocks)!s:<6} params={params / 1e6:7.2f}M"
