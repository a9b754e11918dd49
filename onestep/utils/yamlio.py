"""YAML in and out, safely (``yaml.SafeLoader``: no Python tags, never runs code), with one fix:
YAML 1.1 (PyYAML's dialect) reads ``1e-4`` as a string because its float pattern needs a dot; here
every number written the way people write learning rates (``1e-4``, ``3E-5``, ``1e30``, ``.5``,
``+2.0e-3``) is a float, as in YAML 1.2."""

from __future__ import annotations

import re
from typing import Any

import yaml


class Loader(yaml.SafeLoader):
    """SafeLoader whose floats follow YAML 1.2 (exponents without a dot are floats)."""


# Drop SafeLoader's float resolver for this subclass and add the YAML 1.2 one (plus .inf/.nan).
Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class Dumper(yaml.SafeDumper):
    """SafeDumper that resolves plain scalars as ``Loader`` reads them, so that a string which YAML 1.2
    reads as a float (a git commit such as ``8e70025``, the text ``1e-4``) is written quoted and reads
    back as the same string."""


Dumper.yaml_implicit_resolvers = Loader.yaml_implicit_resolvers


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass


def safe_dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=Dumper, sort_keys=False, default_flow_style=None)
