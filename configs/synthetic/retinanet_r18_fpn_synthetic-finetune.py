# RetinaNet, ResNet-18 FPN, in the fine-tuning regime of faster-rcnn_r18_fpn_synthetic-
# finetune.py (the same pretrained backbone, data and schedule): the one-stage detector of
# the accuracy study (SBP in the RetinaNet head, README Accuracy). Dense baseline of
# retinanet_r18_fpn_sbp_synthetic-finetune.py.
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', './_base_/synthetic_coco_finetune.py']

model = dict(
    backbone=dict(
        depth=18,
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/synthetic_r18_backbone.pth')),
    # narrow, as the Faster R-CNN demo model: four shape classes, and a CPU
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    bbox_head=dict(in_channels=64, feat_channels=64,
                   num_classes=4))  # the synthetic set's shape classes
