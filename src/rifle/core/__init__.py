"""Framework-agnostic RIFLE core: the schedule, the in-place re-init, the model's structure (head discovery).

RIFLE: Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349.
"""

from .structure import find_head, head_names
from .reinit import INITIALIZERS, clear_optimizer_state, reinit_
from .rifle import Rifle, unwrap_model
from .schedule import DEFAULT_MIN_STEPS_AFTER, RifleScheduleWarning, Schedule, default_guard, make_schedule
from .seeding import derive_seed, generator

__all__ = [
    "Rifle",
    "find_head",
    "head_names",
    "reinit_",
    "clear_optimizer_state",
    "INITIALIZERS",
    "make_schedule",
    "default_guard",
    "Schedule",
    "RifleScheduleWarning",
    "DEFAULT_MIN_STEPS_AFTER",
    "derive_seed",
    "generator",
    "unwrap_model",
]
