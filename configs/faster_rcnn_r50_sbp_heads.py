# configs/faster_rcnn_r50_sbp.py with SBP in the RPN head too (P2-P4, the levels the
# backbone's stride-16 mask covers; P5 and P6 run densely). Not the default: it stores less
# than faster_rcnn_r50_sbp.py but cost accuracy in the fine-tuning study, and the head's
# recompute adds backward compute. Figures: docs/memory.md, docs/speed.md, docs/accuracy.md.
_base_ = './faster_rcnn_r50_sbp.py'

# The head recomputes its 3x3 conv's output in backward (recompute='all'): it stores its
# input alone, for the same gradients.
model = dict(rpn_head=dict(type='RPNHeadSBP', sbp=dict(recompute='all')))
