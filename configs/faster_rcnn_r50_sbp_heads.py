# configs/faster_rcnn_r50_sbp.py with SBP in the RPN head too (P2-P4, the levels the
# backbone's stride-16 mask covers; P5 and P6 run densely). Not the default: its
# accuracy cost has not been measured yet (tools/analysis_tools/sbp_accuracy.py).
_base_ = './faster_rcnn_r50_sbp.py'

model = dict(rpn_head=dict(type='RPNHeadSBP'))
