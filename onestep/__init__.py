"""onestep: one-step generators (MeanFlow, flow matching, consistency models) over one backbone registry."""
__version__ = "0.1.0"
