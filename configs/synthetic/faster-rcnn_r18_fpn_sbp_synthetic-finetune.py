# The fine-tuning regime with Stochastic Backpropagation: stage 1 is frozen, so SBP runs in
# stages 2-3 (ResNetSBP's default skips frozen stages and keeps the last stage dense) and
# in the FPN levels they feed.
_base_ = './faster-rcnn_r18_fpn_synthetic-finetune.py'

model = dict(
    backbone=dict(type='ResNetSBP', sbp=dict(keep_ratio=0.5, sampling='grid')),
    neck=dict(type='FPNSBP'))
custom_hooks = [dict(type='SBPHook')]
