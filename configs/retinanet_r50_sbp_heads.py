# configs/retinanet_r50_sbp.py with SBP in the RetinaNet head too (P3-P4, the levels
# the backbone's stride-16 mask covers; P5-P7 run densely). Not the default: on the
# synthetic RetinaNet fine-tuning benchmark it reached 0.115 mAP (mean of 3 seeds, spread
# 0.024) against 0.344 for SBP without it and 0.388 dense, though not all on one pretrained
# backbone, which alone moved a run by 37 points; on one backbone 0.111-0.172 for the head
# settings against 0.204 without the head (3 seeds each, spreads up to 0.39): likely a
# cost, not measured well yet (README, Accuracy).
# At the inherited keep 0.75 + recompute it stores 0.57x of dense (0.40x without the loss
# computation; 2 x 800x1344, fp32); at keep 0.5 + recompute 0.52x (0.33x). The towers'
# recompute costs compute: backward FLOPs 1.08x of dense at keep 0.75, 0.85x at keep 0.5.
_base_ = './retinanet_r50_sbp.py'

# The towers recompute in backward (recompute='all'): every tower conv feeds a 3x3 conv,
# whose halo around the kept rows covers nearly every row, so storing their inputs saves
# little; recomputing stores each level's input alone, for the same gradients.
model = dict(bbox_head=dict(type='RetinaHeadSBP', sbp=dict(recompute='all')))
