# Faster R-CNN with a small ConvNeXt (the paper's backbone) in place of the demo model's
# ResNet-18: two blocks per stage, stages of 16/32/64/128 channels (the quarter-width
# ResNet-18's), the model of the synthetic ConvNeXt configs. Its recipe is mmdet's ConvNeXt
# one (configs/mask_rcnn_convnext_t_sbp.py's base): layer scale 1.0, AdamW with layer-wise
# learning-rate decay; no DropPath (eight blocks need no stochastic depth).
_base_ = './faster-rcnn_r18_fpn_narrow.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.ConvNeXt',
        arch=dict(depths=[2, 2, 2, 2], channels=[16, 32, 64, 128]),
        out_indices=[0, 1, 2, 3],
        drop_path_rate=0.,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
        init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128]))
