# Faster R-CNN, ResNet-18 FPN, trained from scratch on the synthetic shapes dataset
# (tools/make_synthetic_coco.py) in minutes on a CPU: the `make demo` model.
#
# Variants change a few keys: an SBP variant swaps model.backbone.type / model.neck.type,
# faster-rcnn_r18_fpn_synthetic-tiny.py shrinks data and schedule for the tests.
_base_ = ['./_base_/faster-rcnn_r18_fpn_narrow.py', './_base_/synthetic_coco_detection.py']
