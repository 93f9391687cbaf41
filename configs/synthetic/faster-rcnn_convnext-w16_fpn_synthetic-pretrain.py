# Dense pretraining of the small-ConvNeXt Faster R-CNN on the second synthetic set, as
# faster-rcnn_r18_fpn_synthetic-pretrain.py does for the ResNet-18: its backbone is the
# pretrained ConvNeXt of faster-rcnn_convnext-w16_fpn{,_sbp}_synthetic-finetune.py. Made by
#   python tools/pretrain_synthetic_backbone.py \
#       --config configs/synthetic/faster-rcnn_convnext-w16_fpn_synthetic-pretrain.py \
#       --out checkpoints/synthetic_convnext-w16_backbone.pth
_base_ = ['./_base_/faster-rcnn_convnext-w16_fpn_narrow.py', './_base_/synthetic_coco_detection.py']

data_root = 'data/synthetic_coco_pretrain/'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# ConvNeXt's optimizer (AdamW, weight decay 0.05), without the layer-wise decay of
# fine-tuning: every layer is new here.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.001, betas=(0.9, 0.999), weight_decay=0.05))
max_iters = 1600
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, T_max=max_iters - 50,
         eta_min_ratio=0.01),
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
