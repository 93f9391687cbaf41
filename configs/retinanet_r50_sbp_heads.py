# configs/retinanet_r50_sbp.py with SBP in the RetinaNet head too (P3-P4, the levels
# the backbone's stride-16 mask covers; P5-P7 run densely). Not the default: on the
# synthetic RetinaNet benchmark the SBP head costs accuracy on every seed (docs/accuracy.md,
# "RetinaNet, fine-tuning"), and the towers' recompute adds backward compute. Figures:
# docs/memory.md, docs/speed.md, docs/accuracy.md.
_base_ = './retinanet_r50_sbp.py'

# The towers recompute in backward (recompute='all'): every tower conv feeds a 3x3 conv,
# whose halo around the kept rows covers nearly every row, so storing their inputs saves
# little; recomputing stores each level's input alone, for the same gradients.
model = dict(bbox_head=dict(type='RetinaHeadSBP', sbp=dict(recompute='all')))
