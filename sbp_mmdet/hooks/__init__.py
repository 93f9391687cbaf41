from .sbp_hook import SBPHook, keep_ratio_schedule

__all__ = ['SBPHook', 'keep_ratio_schedule']
