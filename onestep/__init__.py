"""onestep: one-step generators (MeanFlow, flow matching, consistency models) over one backbone registry.

``onestep.load_model`` and ``onestep.generate`` (``onestep.api``) are imported on first use, so
``import onestep`` stays light.
"""

from onestep.utils.version import __version__

__all__ = ["__version__", "load_model", "generate", "Model"]

_API = ("load_model", "generate", "Model")


def __getattr__(name: str):
    if name in _API:
        from onestep import api

        return getattr(api, name)
    raise AttributeError(f"module 'onestep' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
