# RetinaNet X101-32x4d-FPN 1x COCO with Stochastic Backpropagation in the backbone
# (stages 2-3; stage 1 is frozen, stage 4 stays dense) and the neck.
_base_ = 'mmdet::retinanet/retinanet_x101-32x4d_fpn_1x_coco.py'

custom_imports = dict(imports=['sbp_mmdet'], allow_failed_imports=False)

model = dict(
    # Keep 0.75 with recompute: it stores less than keep 0.5 without recompute, and the
    # Faster R-CNN fine-tuning studies have not found it further from dense than keep 0.5;
    # keep_ratio=0.5, recompute=False trains faster. Figures: docs/memory.md, docs/speed.md,
    # docs/accuracy.md.
    backbone=dict(type='ResNeXtSBP', sbp=dict(keep_ratio=0.75, sampling='grid', recompute=True)),
    neck=dict(type='FPNSBP'))
# Keep-ratio schedules, SBP logging and exact --resume (masks and random draws). Data
# workers restart each epoch, seeded from the run seed, so that a run resumed at an epoch
# draws the augmentations of the interrupted run (persistent workers would carry their
# random state over from earlier epochs).
custom_hooks = [dict(type='SBPHook')]
train_dataloader = dict(persistent_workers=False)
