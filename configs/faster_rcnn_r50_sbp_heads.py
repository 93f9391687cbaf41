# configs/faster_rcnn_r50_sbp.py with SBP in the RPN head too (P2-P4, the levels the
# backbone's stride-16 mask covers; P5 and P6 run densely). Not the default: at the keep
# 0.75 + recompute it inherits it stores 0.49x of dense instead of 0.56x (2 x 800x1344,
# fp32), but cost 2.1 mAP points against dense, 1.4 against the same setting without it, in
# the fine-tuning study (3 seeds; at keep 0.5 it cost 5.2; README, Accuracy), and its
# backward does 1.05x of dense's FLOPs (0.94x without the head's recompute).
_base_ = './faster_rcnn_r50_sbp.py'

# The head recomputes its 3x3 conv's output in backward (recompute='all'): it stores its
# input alone, for the same gradients.
model = dict(rpn_head=dict(type='RPNHeadSBP', sbp=dict(recompute='all')))
