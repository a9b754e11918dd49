"""Checkpoint formats: public checkpoints as exact onestep velocity models.

A spec ``FORMAT:PATH[#heads=N]`` names a file and how to read it (``spec.py``). Registered formats
(``onestep.registry.FORMATS``; ``onestep ls formats``):

* ``dit``: DiT's ε-prediction DDPM models -> ``VPEpsilonTeacher`` (teacher only);
* ``sit``: SiT's velocity models (data at τ = 1) -> a plain onestep DiT with the flip folded in;
* ``repa_sit``: REPA's SiT (already onestep's convention) -> a plain onestep DiT.

Usage::

    from onestep.formats import load_teacher, init_state
    teacher = load_teacher("sit:SiT-XL-2-256x256.pt")        # frozen; teacher(z, t, y=y) = v(z_t, t)
    student.load_state_dict(init_state("repa_sit:last.pt", student))  # student = dit_xl_2(num_classes=1000)

Files are read with ``torch.load(weights_only=True)`` only (``reading.py``). Module map:
``reading`` (safe loading, wrappers, legacy names), ``arch`` (shapes -> architecture, key checks),
``convert`` (official -> onestep DiT weights: names, learned Σ, the position-layout permutation,
the SiT time-flip fold), ``vp`` (DiT's DDPM schedule as a velocity), ``teachers``, ``official``
(the three formats), ``base`` (the format interface and spec-level functions).
"""
from .base import CheckpointFormat, describe, get_format, init_state, load_teacher
from .official import DiTFormat, RepaSiTFormat, SiTFormat
from .spec import CheckpointSpec, parse_spec
from .teachers import SiTTeacher
from .vp import VPEpsilonTeacher

__all__ = [
    "CheckpointFormat", "CheckpointSpec", "parse_spec", "get_format", "load_teacher", "init_state", "describe",
    "DiTFormat", "SiTFormat", "RepaSiTFormat", "VPEpsilonTeacher", "SiTTeacher",
]
