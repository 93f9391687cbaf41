# The demo model with Stochastic Backpropagation: ResNet-18 stages 1-3 and the
# FPN levels they feed compute gradients on half of the rows each iteration.
_base_ = './faster-rcnn_r18_fpn_synthetic.py'

model = dict(
    backbone=dict(type='ResNetSBP', sbp=dict(keep_ratio=0.5, sampling='grid')),
    neck=dict(type='FPNSBP'))
custom_hooks = [dict(type='SBPHook')]
