# Fine-tuning regime (COCO practice on the synthetic set): the backbone starts from the
# dense pretraining on the second synthetic set (tools/pretrain_synthetic_backbone.py),
# stage 1 and the stem are frozen, BatchNorm statistics stay fixed (norm_eval); the neck
# and the heads are newly initialised. Dense baseline of faster-rcnn_r18_fpn_sbp_synthetic-
# finetune.py.
_base_ = './faster-rcnn_r18_fpn_synthetic.py'

model = dict(
    backbone=dict(
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(_delete_=True, type='Pretrained',
                      checkpoint='checkpoints/synthetic_r18_backbone.pth')))

# A short schedule, as fine-tuning from a pretrained backbone needs fewer iterations.
max_iters = 200
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, T_max=max_iters - 50,
         eta_min_ratio=0.01),
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
