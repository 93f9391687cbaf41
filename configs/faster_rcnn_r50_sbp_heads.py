# configs/faster_rcnn_r50_sbp.py with SBP in the RPN head too (P2-P4, the levels the
# backbone's stride-16 mask covers; P5 and P6 run densely). Not the default: it stores
# 0.58x of dense instead of 0.64x but cost 5.2 mAP points in the fine-tuning study (README,
# Accuracy).
_base_ = './faster_rcnn_r50_sbp.py'

model = dict(rpn_head=dict(type='RPNHeadSBP'))
