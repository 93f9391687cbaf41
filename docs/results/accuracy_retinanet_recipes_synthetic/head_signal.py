"""The rms of the RetinaNet tower output and the classifier logits at initialisation, for a
unit-variance input: the 256-wide head (COCO) against the 64-wide one of the synthetic
benchmark at std 0.01 and 0.02. Run: .venv/bin/python <this file>."""
import torch
from mmdet.models.dense_heads import RetinaHead
from mmengine.registry import init_default_scope
init_default_scope('mmdet')
torch.manual_seed(0)
anchor = dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3,
              ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128])
coder = dict(type='DeltaXYWHBBoxCoder', target_means=[.0] * 4, target_stds=[1.0] * 4)
for width, std in ((256, 0.01), (64, 0.01), (64, 0.02)):
    init = dict(type='Normal', layer='Conv2d', std=std,
                override=dict(type='Normal', name='retina_cls', std=0.01, bias_prob=0.01))
    head = RetinaHead(4, width, feat_channels=width, anchor_generator=anchor, bbox_coder=coder,
                      init_cfg=init)
    head.init_weights()
    x = torch.randn(2, width, 32, 32)
    h = x
    for conv in head.cls_convs:
        h = conv(h)
    score = head.retina_cls(h)
    score.sum().backward()
    g = head.cls_convs[0].conv.weight.grad.norm().item()
    print(f'width {width} std {std}: tower out rms {h.pow(2).mean().sqrt():.2e}, '
          f'logit std {score.std():.2e}, |grad conv0| {g:.2e}')
