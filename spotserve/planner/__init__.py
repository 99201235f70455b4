"""Planner: the policy core that picks configs and plans migrations (numpy/scipy only; no torch, no MPI).

Call sequence: see spotserve/planner/types.py.
"""
from spotserve.planner.arranger import InterruptionArranger
from spotserve.planner.cost import CostModel, Workload, stage_layer_ranges
from spotserve.planner.mapper import DeviceMapper, Mapping
from spotserve.planner.migration import MigrationPlanner, MigrationResult, estimate_seconds
from spotserve.planner.optimizer import Choice, ConfigOptimizer
from spotserve.planner.planner import Planner, PlannerSwitches
from spotserve.planner.profiles import Profile, load_profile, parse_profile
from spotserve.planner.types import (GPU, Instance, InterruptionDecision, ParallelConfig, Position,
                                     ReconfigurationPlan, RequestDecision, RunningRequest, Transfer, gpus_of)

__all__ = [
    "CostModel", "ConfigOptimizer", "DeviceMapper", "MigrationPlanner", "InterruptionArranger", "Planner", "PlannerSwitches",
    "Choice", "Mapping", "MigrationResult", "Workload", "Profile", "load_profile", "parse_profile",
    "stage_layer_ranges", "estimate_seconds", "GPU", "Instance", "ParallelConfig", "Position", "Transfer",
    "ReconfigurationPlan", "RequestDecision", "InterruptionDecision", "RunningRequest", "gpus_of",
]
