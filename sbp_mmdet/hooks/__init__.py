from .sbp_hook import SBPHook, feed_gt_boxes, keep_ratio_schedule

__all__ = ['SBPHook', 'feed_gt_boxes', 'keep_ratio_schedule']
