# Mask R-CNN ConvNeXt-T FPN 3x COCO (mmdet's AMP, multi-scale crop config) with Stochastic
# Backpropagation in the backbone (stages 1-3, their stem/downsampling layers and output
# norms; stage 4 stays dense) and the neck.
_base_ = 'mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py'

# sbp_mmdet loads mmpretrain's ConvNeXt itself (and registers ConvNeXtSBP)
custom_imports = dict(imports=['sbp_mmdet'], allow_failed_imports=False)

model = dict(
    # Keep 0.75 + recompute, as the ResNet COCO configs: on the synthetic ConvNeXt study it
    # is not distinguishable from dense (-0.7 mAP points [-2.0, +0.6]) where keep 0.5 costs
    # -1.0 [-1.7, -0.4], and on ConvNeXt-T it stores 0.26x of dense's bytes against keep
    # 0.5's 0.46x, for 0.91x of dense's backward FLOPs against 0.70x (docs/accuracy.md,
    # "ConvNeXt, fine-tuning"; docs/memory.md).
    backbone=dict(type='ConvNeXtSBP',
                  sbp=dict(keep_ratio=0.75, sampling='grid', recompute=True)),
    neck=dict(type='FPNSBP'))
# Keep-ratio schedules, SBP logging and exact --resume (see faster_rcnn_r50_sbp.py).
custom_hooks = [dict(type='SBPHook')]
train_dataloader = dict(persistent_workers=False)
