# configs/retinanet_r50_sbp.py with SBP in the RetinaNet head too (P3-P4, the levels
# the backbone's stride-16 mask covers; P5-P7 run densely). Not the default: its
# accuracy cost has not been measured yet (tools/analysis_tools/sbp_accuracy.py).
_base_ = './retinanet_r50_sbp.py'

model = dict(bbox_head=dict(type='RetinaHeadSBP'))
