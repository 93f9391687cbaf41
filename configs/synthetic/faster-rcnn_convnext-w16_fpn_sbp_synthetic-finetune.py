# faster-rcnn_convnext-w16_fpn_synthetic-finetune.py with Stochastic Backpropagation, at the
# setting configs/mask_rcnn_convnext_t_sbp.py ships: stages 1-3 (their stem/downsampling
# layers and output norms; the last stage stays dense) and the FPN levels they feed.
_base_ = './faster-rcnn_convnext-w16_fpn_synthetic-finetune.py'

model = dict(
    backbone=dict(type='ConvNeXtSBP', sbp=dict(keep_ratio=0.5, sampling='grid')),
    neck=dict(type='FPNSBP'))
custom_hooks = [dict(type='SBPHook')]
