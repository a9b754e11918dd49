"""onestep: one-step generators (MeanFlow, flow matching, consistency models) over one backbone registry."""
from onestep.utils.version import __version__

__all__ = ["__version__"]
