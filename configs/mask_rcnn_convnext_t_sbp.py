# Mask R-CNN ConvNeXt-T FPN 3x COCO (mmdet's AMP, multi-scale crop config) with Stochastic
# Backpropagation in the backbone (stages 1-3, their stem/downsampling layers and output
# norms; stage 4 stays dense) and the neck.
_base_ = 'mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py'

# sbp_mmdet loads mmpretrain's ConvNeXt itself (and registers ConvNeXtSBP)
custom_imports = dict(imports=['sbp_mmdet'], allow_failed_imports=False)

model = dict(
    # Keep 0.75 + recompute, as the ResNet COCO configs: on the synthetic ConvNeXt study it
    # costs less accuracy than keep 0.5, and on ConvNeXt-T it stores fewer bytes, for more
    # backward compute (docs/accuracy.md, "ConvNeXt, fine-tuning").
    backbone=dict(type='ConvNeXtSBP',
                  sbp=dict(keep_ratio=0.75, sampling='grid', recompute=True)),
    neck=dict(type='FPNSBP'))
# Keep-ratio schedules, SBP logging and exact --resume (see faster_rcnn_r50_sbp.py).
custom_hooks = [dict(type='SBPHook')]
train_dataloader = dict(persistent_workers=False)
