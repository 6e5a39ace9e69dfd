"""``mtckpt plan``: how often to save to each tier, and the goodput to expect.

A multi-level extension of Young's optimum (:mod:`.model`), checked by a discrete-event
simulation (:mod:`.simulate`); the inputs (:mod:`.inputs`) come from flags, the version-1
JSON file the cluster harness writes, or a quick probe of this node (:mod:`.probe`).
"""

from .inputs import (
    FAILURE_CLASSES,
    TIERS,
    PlanInputError,
    PlanInputs,
    TierCost,
    build_inputs,
    inputs_json,
    read_inputs_file,
    survives,
)
from .model import Plan, Recovery, Schedule, YoungDaly, evaluate, optimize, young_daly
from .simulate import SimulationResult, simulate

__all__ = [
    "FAILURE_CLASSES",
    "TIERS",
    "Plan",
    "PlanInputError",
    "PlanInputs",
    "Recovery",
    "Schedule",
    "SimulationResult",
    "TierCost",
    "YoungDaly",
    "build_inputs",
    "evaluate",
    "inputs_json",
    "optimize",
    "read_inputs_file",
    "simulate",
    "survives",
    "young_daly",
]
