"""Checkpoint formats: onestep's own runs and exports, and public checkpoints as exact onestep
velocity models.

A spec ``FORMAT:PATH[#heads=N]`` names a file and how to read it (``spec.py``); a plain path is the
``onestep`` format. Registered formats (``onestep.registry.FORMATS``; ``onestep ls formats``):

* ``onestep``: run directories, checkpoint files, export directories (``onestep.py``, ``export.py``);
* ``dit``: DiT's ε-prediction DDPM models -> ``VPEpsilonTeacher`` (teacher only);
* ``sit``: SiT's velocity models (data at τ = 1) -> a plain onestep DiT with the flip folded in;
* ``repa_sit``: REPA's SiT (already onestep's convention) -> a plain onestep DiT.

Usage::

    from onestep.formats import load_teacher, init_state, open_model
    teacher = load_teacher("sit:SiT-XL-2-256x256.pt")        # frozen; teacher(z, t, y=y) = v(z_t, t)
    student.load_state_dict(init_state("repa_sit:last.pt", student))  # student = dit_xl_2(num_classes=1000)
    model = open_model("runs/meanflow_b2")                    # net, objective, dataset (or stand-in), step

Files are read with ``torch.load(weights_only=True)`` or safetensors only (``reading.py``,
``onestep.py``). Module map: ``reading`` (safe loading, wrappers, legacy names), ``arch`` (shapes ->
architecture, key checks), ``convert`` (official -> onestep DiT weights: names, learned Σ, the
position-layout permutation, the SiT time-flip fold), ``vp`` (DiT's DDPM schedule as a velocity),
``teachers``, ``official`` (the three public formats), ``onestep`` (our runs and exports,
``load_run``), ``export`` (``onestep export``), ``data`` (stand-ins for data that is not here),
``resolve`` (specs where a checkpoint is taken: teacher, init, sampling), ``base`` (the format
interface and spec-level functions).
"""

from .base import CheckpointFormat, as_spec, describe, get_format, init_state, load_teacher
from .data import ModelData, ModelLatents
from .export import export_model, model_card
from .official import DiTFormat, RepaSiTFormat, SiTFormat
from .onestep import LoadedRun, OnestepFormat, is_export, load_run, read_onestep
from .resolve import init_weights, open_model, recipe_teacher, resolve_teacher, spec_note
from .spec import CheckpointSpec, parse_spec
from .teachers import SiTTeacher
from .vp import VPEpsilonTeacher

__all__ = [
    "CheckpointFormat",
    "CheckpointSpec",
    "parse_spec",
    "as_spec",
    "get_format",
    "load_teacher",
    "init_state",
    "describe",
    "DiTFormat",
    "SiTFormat",
    "RepaSiTFormat",
    "OnestepFormat",
    "VPEpsilonTeacher",
    "SiTTeacher",
    "LoadedRun",
    "load_run",
    "read_onestep",
    "is_export",
    "export_model",
    "model_card",
    "ModelData",
    "ModelLatents",
    "open_model",
    "resolve_teacher",
    "recipe_teacher",
    "init_weights",
    "spec_note",
]
