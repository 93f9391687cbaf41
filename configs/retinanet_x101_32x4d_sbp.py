# RetinaNet X101-32x4d-FPN 1x COCO with Stochastic Backpropagation in the backbone
# (stages 2-3; stage 1 is frozen, stage 4 stays dense) and the neck.
_base_ = 'mmdet::retinanet/retinanet_x101-32x4d_fpn_1x_coco.py'

custom_imports = dict(imports=['sbp_mmdet'], allow_failed_imports=False)

model = dict(
    backbone=dict(type='ResNeXtSBP', sbp=dict(keep_ratio=0.5, sampling='grid')),
    neck=dict(type='FPNSBP'))
# Keep-ratio schedules, SBP logging and exact --resume (masks and random draws). Data
# workers restart each epoch, seeded from the run seed, so that a run resumed at an epoch
# draws the augmentations of the interrupted run (persistent workers would carry their
# random state over from earlier epochs).
custom_hooks = [dict(type='SBPHook')]
train_dataloader = dict(persistent_workers=False)
