# The SBP demo model on the smallest input, for smoke tests (see the dense -tiny config).
_base_ = './faster-rcnn_r18_fpn_synthetic-tiny.py'

model = dict(
    backbone=dict(type='ResNetSBP', sbp=dict(keep_ratio=0.5, sampling='grid')),
    neck=dict(type='FPNSBP'))
custom_hooks = [dict(type='SBPHook')]
