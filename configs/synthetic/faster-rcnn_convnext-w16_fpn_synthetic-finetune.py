# The fine-tuning regime of faster-rcnn_r18_fpn_synthetic-finetune.py with the small ConvNeXt
# (the paper's backbone): it starts from the dense pretraining on the second synthetic set
# (faster-rcnn_convnext-w16_fpn_synthetic-pretrain.py, tools/pretrain_synthetic_backbone.py);
# the neck and the heads are newly initialised. Recipe of mmdet's ConvNeXt configs (the base
# of configs/mask_rcnn_convnext_t_sbp.py): every stage trains (no frozen stage), AdamW with
# layer-wise learning-rate decay. Dense baseline of
# faster-rcnn_convnext-w16_fpn_sbp_synthetic-finetune.py.
_base_ = [
    './_base_/faster-rcnn_convnext-w16_fpn_narrow.py', './_base_/synthetic_coco_finetune.py'
]

model = dict(
    backbone=dict(
        init_cfg=dict(_delete_=True, type='Pretrained',
                      checkpoint='configs/synthetic/weights/'
                      'synthetic_convnext-w16_backbone-6e7c2dda.pth')))

# mmdet's ConvNeXt optimizer (num_layers 6: the depth ids of a four-stage ConvNeXt) at the
# pretraining's learning rate, as the ResNet-18 fine-tune keeps its pretraining's
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6),
    optimizer=dict(type='AdamW', lr=0.001, betas=(0.9, 0.999), weight_decay=0.05))
