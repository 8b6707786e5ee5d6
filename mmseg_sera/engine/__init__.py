from .compat import adapt_dist_cfg, register_checkpoint_safe_globals
from .hooks import RNGStateHook

register_checkpoint_safe_globals()

__all__ = [
    'adapt_dist_cfg', 'register_checkpoint_safe_globals', 'RNGStateHook'
]
