# retinanet_r18_fpn_synthetic-finetune.py with Stochastic Backpropagation: stage 1 is
# frozen, so SBP runs in stages 2-3 and in the FPN levels they feed; RetinaHeadSBP adds
# the head (tools/analysis_tools/sbp_accuracy.py variant suffix :sbp_retina_head).
_base_ = './retinanet_r18_fpn_synthetic-finetune.py'

model = dict(
    backbone=dict(type='ResNetSBP', sbp=dict(keep_ratio=0.5, sampling='grid')),
    neck=dict(type='FPNSBP'))
custom_hooks = [dict(type='SBPHook')]
