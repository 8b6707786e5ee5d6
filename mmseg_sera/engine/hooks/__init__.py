from .cpu_plan_hook import CPUPlanHook
from .expert_utilisation_hook import ExpertUtilisationHook
from .rng_state_hook import RNGStateHook

__all__ = ['CPUPlanHook', 'ExpertUtilisationHook', 'RNGStateHook']
