"""The small modules, SBP programs, detectors and batches the tests build.

The test files import them from here (no test file imports another); the
comparisons with SBP's reference are in ``sbp_reference``.
"""
import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Sequence, Tuple

import torch
from mmengine.config import Config, ConfigDict
from mmengine.hub import get_config
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sbp_mmdet.models import ResNetSBP
from sbp_mmdet.sbp import SBPProgram, conv_unit

REPO = Path(__file__).resolve().parents[1]
TINY_DATA_CFG = Config.fromfile(
    str(REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_synthetic-tiny.py'))


# ---------------------------------------------------------------- blocks and programs


def random_bn(channels: int, train: bool) -> nn.BatchNorm2d:
    """A BatchNorm with random affine parameters and running statistics."""
    norm = nn.BatchNorm2d(channels)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -0.5, 0.5)
    norm.running_mean.uniform_(-0.2, 0.2)
    norm.running_var.uniform_(0.5, 2.0)
    return norm.train(train)


def bottleneck(cin: int = 16, mid: int = 8, stride: int = 2, train: bool = True) -> nn.ModuleDict:
    """The layers of a bottleneck with a conv shortcut."""
    return nn.ModuleDict(dict(
        conv1=nn.Conv2d(cin, mid, 1, bias=False), norm1=random_bn(mid, train),
        conv2=nn.Conv2d(mid, mid, 3, stride, 1, bias=False), norm2=random_bn(mid, train),
        conv3=nn.Conv2d(mid, mid * 4, 1, bias=False), norm3=random_bn(mid * 4, train),
        dconv=nn.Conv2d(cin, mid * 4, 1, stride, bias=False), dnorm=random_bn(mid * 4, train)))


def bottleneck_program(m: nn.ModuleDict) -> SBPProgram:
    return SBPProgram([conv_unit('conv1', 'input', m['conv1'], m['norm1'], relu_after=True),
                       conv_unit('conv2', 'conv1', m['conv2'], m['norm2'], relu_after=True),
                       conv_unit('down', 'input', m['dconv'], m['dnorm']),
                       conv_unit('conv3', 'conv2', m['conv3'], m['norm3'], relu_after=True,
                                 residual='down')])


def basic(channels: int = 8, train: bool = True) -> nn.ModuleDict:
    """The layers of a basic block (3x3 input conv, identity shortcut)."""
    return nn.ModuleDict(dict(
        conv1=nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
        norm1=random_bn(channels, train),
        conv2=nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
        norm2=random_bn(channels, train)))


def basic_program(m: nn.ModuleDict) -> SBPProgram:
    return SBPProgram([conv_unit('conv1', 'input', m['conv1'], m['norm1'], relu_after=True),
                       conv_unit('conv2', 'conv1', m['conv2'], m['norm2'], relu_after=True,
                                 residual='input')])


def fpn_output(channels: int = 8) -> nn.ModuleDict:
    """An FPN output conv (3x3, with bias)."""
    return nn.ModuleDict(dict(conv=nn.Conv2d(channels, channels, 3, 1, 1)))


def fpn_program(m: nn.ModuleDict) -> SBPProgram:
    return SBPProgram([conv_unit('conv', 'input', m['conv'])])


# ---------------------------------------------------------------- backbones and detectors


def resnet_pair(depth: int, **kwargs) -> Tuple[nn.Module, nn.Module]:
    """``ResNetSBP`` (with informative BatchNorms) and mmdet's ``ResNet`` with
    its weights, both in train mode."""
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    sbp = ResNetSBP(depth=depth, sbp=kwargs.pop('sbp', None), **kwargs)
    for m in sbp.modules():  # non-trivial BN so that gradients are informative
        if isinstance(m, _BatchNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    dense = ResNet(depth=depth, **kwargs)
    dense.load_state_dict(sbp.state_dict())
    sbp.train()  # mmdet's ResNet.train returns None
    dense.train()
    return sbp, dense


def small_faster_rcnn_cfg(sbp: bool, keep_ratio: float = 0.5) -> ConfigDict:
    """mmdet's Faster R-CNN R50 config shrunk (R18, 32 channels, 3 classes);
    ``sbp``: ``ResNetSBP`` (random sampling) and ``FPNSBP``."""
    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py').model
    cfg.backbone.update(depth=18, init_cfg=None, frozen_stages=-1, norm_eval=False)
    cfg.neck.update(in_channels=[64, 128, 256, 512], out_channels=32)
    cfg.rpn_head.update(in_channels=32, feat_channels=32)
    cfg.roi_head.bbox_roi_extractor.update(out_channels=32)
    cfg.roi_head.bbox_head.update(in_channels=32, fc_out_channels=64, num_classes=3)
    if sbp:
        cfg.backbone.update(type='ResNetSBP', sbp=dict(keep_ratio=keep_ratio, sampling='random'))
        cfg.neck.type = 'FPNSBP'
    return cfg


def faster_rcnn_cfg(sbp: bool) -> ConfigDict:
    """``small_faster_rcnn_cfg`` with ``RPNHeadSBP`` too."""
    cfg = small_faster_rcnn_cfg(sbp)
    if sbp:
        cfg.rpn_head.type = 'RPNHeadSBP'
    return cfg


def small_retinanet_cfg(sbp: bool, heads: bool = True) -> ConfigDict:
    """mmdet's RetinaNet R50 config shrunk; ``sbp``: SBP backbone and neck, and
    ``RetinaHeadSBP`` with ``heads``."""
    cfg = get_config('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py').model
    cfg.backbone.update(depth=18, init_cfg=None, frozen_stages=-1, norm_eval=False)
    cfg.neck.update(in_channels=[64, 128, 256, 512], out_channels=32)
    cfg.bbox_head.update(in_channels=32, feat_channels=32, stacked_convs=2, num_classes=3)
    if sbp:
        cfg.backbone.update(type='ResNetSBP', sbp=dict(keep_ratio=0.5, sampling='random'))
        cfg.neck.type = 'FPNSBP'
        if heads:
            cfg.bbox_head.type = 'RetinaHeadSBP'
    return cfg


def build_detector(cfg: ConfigDict, seed: int = 0) -> nn.Module:
    """The detector of model config ``cfg``, initialised from ``seed``, in train mode."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    torch.manual_seed(seed)
    model = MODELS.build(cfg)
    model.init_weights()
    model.train()
    return model


def preprocessed_batch(model: nn.Module, shapes: Sequence[Tuple[int, int]]) -> dict:
    """Random images of ``shapes`` (height, width) with boxes, batched (padded to a
    multiple of 32) by the model's ``DetDataPreprocessor``."""
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    packed = demo_mm_inputs(batch_size=len(shapes), image_shapes=[(3, h, w) for h, w in shapes],
                            num_items=[8] * len(shapes), num_classes=3)
    data = model.data_preprocessor(packed, True)
    padded = [32 * math.ceil(max(size) / 32) for size in zip(*shapes)]
    assert list(data['inputs'].shape[2:]) == padded
    return data


def load_tool(path: str) -> ModuleType:
    """The repository script at ``path`` (e.g. ``tools/analysis_tools/sbp_accuracy.py``),
    imported as a module."""
    spec = importlib.util.spec_from_file_location('tool_' + Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
