from .sbp_hook import SBPHook, feed_gt_boxes, keep_ratio_schedule
from .step_seed_hook import StepSeedHook

__all__ = ['SBPHook', 'StepSeedHook', 'feed_gt_boxes', 'keep_ratio_schedule']
