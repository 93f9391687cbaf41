# Dense pretraining of the demo detector on a second synthetic set (other images, same
# four shape classes): its backbone plays the ImageNet-pretrained ResNet of COCO practice
# for the fine-tuning configs (*-finetune.py). Made by tools/pretrain_synthetic_backbone.py:
#   python tools/make_synthetic_coco.py data/synthetic_coco_pretrain --seed 7
#   python tools/train.py configs/synthetic/faster-rcnn_r18_fpn_synthetic-pretrain.py
#   (then the backbone's weights are saved to checkpoints/synthetic_r18-w16_backbone.pth)
_base_ = './faster-rcnn_r18_fpn_synthetic.py'

# A ResNet-18 at a quarter of the width (stages of 16/32/64/128 channels): four shape
# classes need no more, its weights fit in a small file the repository ships, and the
# fine-tuning runs of the accuracy study take half the time.
model = dict(backbone=dict(base_channels=16), neck=dict(in_channels=[16, 32, 64, 128]))

data_root = 'data/synthetic_coco_pretrain/'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

max_iters = 1600
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, T_max=max_iters - 50,
         eta_min_ratio=0.01),
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
