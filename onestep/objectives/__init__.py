"""Objectives: the paper's math. Importing this package registers them in ``OBJECTIVES``."""
from onestep.objectives.base import LossOutput, Objective, batch_time, expand_time
from onestep.objectives.consistency import (ConsistencyDistillation, ConsistencyTraining,
                                             EasyConsistencyTuning, consistency_fn)
from onestep.objectives.flow_matching import FlowMatching, adaptive_weight, cfg_velocity, velocity
from onestep.objectives.meanflow import MeanFlow, meanflow_jvp, meanflow_target
from onestep.objectives.scm import SCM
from onestep.objectives.time_sampling import logit_normal, sample_t_r, uniform

__all__ = [
    "LossOutput", "Objective", "batch_time", "expand_time",
    "FlowMatching", "MeanFlow", "adaptive_weight", "cfg_velocity", "velocity",
    "meanflow_jvp", "meanflow_target", "logit_normal", "sample_t_r", "uniform",
    "ConsistencyTraining", "ConsistencyDistillation", "EasyConsistencyTuning", "consistency_fn", "SCM",
]
