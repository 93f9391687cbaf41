# Faster R-CNN, ResNet-18 FPN, narrowed for the synthetic shapes dataset and a CPU: the
# model of the demo configs.
_base_ = 'mmdet::_base_/models/faster-rcnn_r50_fpn.py'

model = dict(
    backbone=dict(
        depth=18,
        frozen_stages=-1,  # nothing pretrained to keep
        norm_eval=False,  # BN statistics are learnt along
        init_cfg=None),  # no pretrained weights: train from scratch
    # Narrow FPN and heads: four shape classes need far less than COCO's 256 channels,
    # and on a CPU the 3x3 convolutions on the stride-4 level dominate a step.
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256,
                       num_classes=4,  # the synthetic set's shape classes
                       reg_class_agnostic=True),  # boxes learn from every positive RoI
    ),
    # RoIAlign and the box head run per RoI: sample fewer RoIs in training and keep fewer
    # proposals in test (four shapes per image at most).
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100)))
