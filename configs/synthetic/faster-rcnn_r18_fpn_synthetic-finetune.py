# Fine-tuning regime (COCO practice on the synthetic set): the backbone starts from the
# dense pretraining on the second synthetic set (tools/pretrain_synthetic_backbone.py),
# stage 1 and the stem are frozen, BatchNorm statistics stay fixed (norm_eval); the neck
# and the heads are newly initialised. Dense baseline of faster-rcnn_r18_fpn_sbp_synthetic-
# finetune.py.
_base_ = ['./_base_/faster-rcnn_r18_fpn_narrow.py', './_base_/synthetic_coco_finetune.py']

model = dict(
    backbone=dict(
        base_channels=16,  # the pretrained ResNet-18's quarter width (pretrain config)
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(_delete_=True, type='Pretrained',
                      checkpoint='configs/synthetic/weights/'
                      'synthetic_r18-w16_backbone-ccbf7f36.pth')),
    neck=dict(in_channels=[16, 32, 64, 128]))
