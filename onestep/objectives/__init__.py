"""Objectives: the paper's math. Importing this package registers them in ``OBJECTIVES``."""

from onestep.objectives.base import LossOutput, Objective
from onestep.objectives.common import adaptive_weight, batch_time, cfg_velocity, expand_time, interpolate, velocity
from onestep.objectives.consistency import ConsistencyDistillation, ConsistencyTraining
from onestep.objectives.consistency_math import consistency_fn
from onestep.objectives.dmf import DecoupledMeanFlow
from onestep.objectives.ect import EasyConsistencyTuning
from onestep.objectives.flow_matching import FlowMatching
from onestep.objectives.improved_meanflow import ImprovedMeanFlow, imf_jvp
from onestep.objectives.meanflow import MeanFlow, meanflow_jvp, meanflow_target
from onestep.objectives.scm import SCM
from onestep.objectives.time_sampling import logit_normal, sample_t_r, uniform

__all__ = [
    "LossOutput",
    "Objective",
    "batch_time",
    "expand_time",
    "interpolate",
    "FlowMatching",
    "MeanFlow",
    "DecoupledMeanFlow",
    "adaptive_weight",
    "cfg_velocity",
    "velocity",
    "meanflow_jvp",
    "meanflow_target",
    "logit_normal",
    "sample_t_r",
    "uniform",
    "ConsistencyTraining",
    "ConsistencyDistillation",
    "EasyConsistencyTuning",
    "consistency_fn",
    "SCM",
    "ImprovedMeanFlow",
    "imf_jvp",
]
