from .checkpoint import (AtomicLocalBackend, CheckpointError,
                         find_resume_checkpoint, read_checkpoint,
                         use_atomic_checkpoints)
from .compat import (adapt_dist_cfg, close_process_group,
                     register_checkpoint_safe_globals)
from .cpu_plan import CPUPlan, apply_cpu_plan, plan_cpu_resources
from .hooks import CPUPlanHook, ExpertUtilisationHook, RNGStateHook
from .optimizers import CPUAmpOptimWrapper
from .routing import RoutingRecord, RoutingRecorder, routing_statistics

register_checkpoint_safe_globals()

__all__ = [
    'AtomicLocalBackend', 'CheckpointError', 'find_resume_checkpoint',
    'read_checkpoint', 'use_atomic_checkpoints',
    'adapt_dist_cfg', 'close_process_group',
    'register_checkpoint_safe_globals', 'RNGStateHook', 'CPUPlanHook',
    'ExpertUtilisationHook', 'RoutingRecord', 'RoutingRecorder',
    'routing_statistics', 'CPUAmpOptimWrapper', 'CPUPlan', 'apply_cpu_plan',
    'plan_cpu_resources'
]
