# configs/faster_rcnn_r50_sbp_heads.py composed for the lowest memory: keep 0.5, SBP on both
# FPN conv groups, and mmdet's with_cp with SBP's recompute in the backbone (SBP blocks store
# only their 3x3 convs' inputs on the kept rows; the dense last stage is checkpointed). Its
# accuracy is not measured: keep 0.5 and the SBP RPN head each cost accuracy in the
# fine-tuning study, and SBP on the output convs is not measured at this setting.
# Figures: docs/memory.md.
_base_ = './faster_rcnn_r50_sbp_heads.py'

model = dict(
    backbone=dict(with_cp=True, sbp=dict(keep_ratio=0.5, recompute=True)),
    neck=dict(sbp=dict(convs=('lateral', 'output'))))
