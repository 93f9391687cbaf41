# RetinaNet Swin-T FPN 1x COCO with Stochastic Backpropagation in the backbone (stages 1-3:
# the MLP branch of every block and the patch merging in front of stages 2-3; the attention
# branch and stage 4 stay dense) and the neck.
_base_ = 'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py'

custom_imports = dict(imports=['sbp_mmdet'], allow_failed_imports=False)

model = dict(
    # Keep 0.5, the modules' default (no accuracy figure on Swin yet). Figures: docs/memory.md.
    backbone=dict(type='SwinTransformerSBP', sbp=dict(keep_ratio=0.5, sampling='grid')),
    neck=dict(type='FPNSBP'))
# Keep-ratio schedules, SBP logging and exact --resume (see faster_rcnn_r50_sbp.py).
custom_hooks = [dict(type='SBPHook')]
train_dataloader = dict(persistent_workers=False)
