# The fine-tuning schedule on the synthetic set (COCO practice: a pretrained backbone needs
# fewer iterations): 200 iterations, warm-up then cosine.
_base_ = './synthetic_coco_detection.py'

max_iters = 200
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, T_max=max_iters - 50,
         eta_min_ratio=0.01),
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
