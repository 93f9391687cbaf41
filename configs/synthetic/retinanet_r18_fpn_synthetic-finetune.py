# RetinaNet, ResNet-18 FPN, in the fine-tuning regime of faster-rcnn_r18_fpn_synthetic-
# finetune.py (the same pretrained backbone and data): the one-stage detector of the
# accuracy study (docs/accuracy.md). Dense baseline of
# retinanet_r18_fpn_sbp_synthetic-finetune.py.
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', './_base_/synthetic_coco_finetune.py']

model = dict(
    backbone=dict(
        depth=18,
        base_channels=16,  # the pretrained ResNet-18's quarter width (pretrain config)
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(type='Pretrained',
                      checkpoint='configs/synthetic/weights/'
                      'synthetic_r18-w16_backbone-ccbf7f36.pth')),
    # narrow, as the Faster R-CNN demo model: four shape classes, and a CPU
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=64),
    # GroupNorm in the towers (FCOS's and ATSS's practice): mmdet's std-0.01 tower init,
    # made for 256 channels, leaves this 64-channel tower's output near zero, and the
    # focal-loss classifier then "took off" only after a seed-dependent number of
    # iterations (docs/accuracy.md, "The RetinaNet benchmark"); GN normalises the tower, and
    # the classifier learns from the first iterations on every seed
    bbox_head=dict(in_channels=64, feat_channels=64,
                   norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
                   num_classes=4))  # the synthetic set's shape classes

# 800 iterations: at 400 the loss is still falling and dense's seeds end further apart
# (docs/accuracy.md, "RetinaNet, fine-tuning")
max_iters = 800
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=0.005), clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, T_max=max_iters - 50,
         eta_min_ratio=0.01),
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
