"""The ResNet family's SBP versions: ResNetV1d/avg_down, ResNeXt, RegNet, Res2Net.

Each is exact in the forward pass, has the gradients of the where/detach
reference, shares its mmdet class's state_dict, is its mmdet class in eval
mode, and swaps into mmdet's stock configs; what has no SBP version is refused
with an error naming it.
"""
import math
import subprocess
import sys

import pytest
import torch
from mmdet.models.backbones import RegNet, Res2Net, ResNet, ResNetV1d, ResNeXt
from mmdet.models.backbones.resnet import Bottleneck
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config
from mmengine.hub import get_config
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import sbp_mmdet  # noqa: F401
from sbp_mmdet.models import (FPNSBP, RegNetSBP, Res2NetSBP, ResNetSBP, ResNetV1dSBP, ResNeXtSBP,
                              sbp_model_problem)
from sbp_mmdet.sbp import (BatchNorm, IdentityMix, PoolMix, RowLocal, SBPIteration, SBPProgram,
                           Unit, conv_unit)

from sbp_builders import REPO, TINY_DATA_CFG, build_detector
from sbp_reference import (add_reference_hooks, assert_grad_close, assert_grads_match,
                           enabled_blocks, reference_program, total_loss)

TINY_REGNET = dict(w0=8, wa=8.0, wm=2.0, group_w=8, depth=6, bot_mul=1.0)
BACKBONES = {  # SBP class, dense class, tiny arguments
    'ResNetV1d': (ResNetV1dSBP, ResNetV1d, dict(depth=50, base_channels=8)),
    'ResNet-avg_down': (ResNetSBP, ResNet, dict(depth=18, base_channels=8, avg_down=True,
                                                deep_stem=True)),
    'ResNeXt': (ResNeXtSBP, ResNeXt, dict(depth=50, groups=4, base_width=4, base_channels=8)),
    'RegNet': (RegNetSBP, RegNet, dict(arch=TINY_REGNET, stem_channels=8, base_channels=8)),
    'Res2Net': (Res2NetSBP, Res2Net, dict(depth=50, scales=4, base_width=4, base_channels=8)),
}


def backbone_pair(name, **kwargs):
    sbp_cls, dense_cls, args = BACKBONES[name]
    torch.manual_seed(0)
    sbp = sbp_cls(**args, **kwargs)
    for m in sbp.modules():  # non-trivial BN so that gradients are informative
        if isinstance(m, _BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    dense = dense_cls(**args, **{k: v for k, v in kwargs.items() if k != 'sbp'})
    dense.load_state_dict(sbp.state_dict())
    sbp.train()  # mmdet's ResNet.train returns None
    dense.train()
    return sbp, dense


def assert_backbone_matches_reference(name, size, **sbp_cfg):
    """The SBP backbone's forward is bitwise its mmdet class's; its gradients
    equal those of the mmdet class masked like SBP's units."""
    sbp, dense = backbone_pair(name, frozen_stages=-1, norm_eval=False,
                               sbp=dict(keep_ratio=0.5, sampling='random', stages=(1, 1, 1, 0),
                                        **sbp_cfg))
    assert sbp.sbp_active()
    x = torch.rand(2, 3, *size)
    outs = sbp(x)
    with torch.no_grad():
        for a, b in zip(outs, dense(x)):
            assert torch.equal(a, b)
    iteration = sbp.sbp_iteration
    # maps at strides 2 to 32: RegNet's stem has stride 2
    add_reference_hooks(enabled_blocks(dense, sbp.sbp_blocks), iteration, size[0],
                        strides=(2, 4, 8, 16, 32))
    ref_outs = dense(x)
    grads = [torch.randn_like(o) for o in outs]
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    sum((o * g).sum() for o, g in zip(ref_outs, grads)).backward()
    assert_grads_match(sbp, dense)
    kept = iteration.kept_rows(sbp.stage_strides[0], outs[0].shape[2])
    assert kept.shape[-1] < outs[0].shape[2]  # some rows really dropped
    return iteration


@pytest.mark.parametrize('name', list(BACKBONES))
@pytest.mark.parametrize('size,recompute', [((64, 96), False), ((61, 45), False),
                                            ((35, 27), False), ((61, 45), True)])
def test_forward_is_bitwise_the_mmdet_class_and_gradients_equal_the_reference(
        name, size, recompute):
    assert_backbone_matches_reference(name, size, recompute=recompute)


@pytest.mark.parametrize('name', list(BACKBONES))
@pytest.mark.parametrize('recompute', [False, True], ids=['store', 'recompute'])
def test_per_image_masks_are_exact_with_the_reference_gradients(name, recompute):
    iteration = assert_backbone_matches_reference(name, (61, 45), recompute=recompute,
                                                  per_image=True)
    assert iteration.per_image
    assert not torch.equal(iteration.base_mask[0], iteration.base_mask[1])


@pytest.mark.parametrize('name', list(BACKBONES))
def test_state_dicts_are_interchangeable_and_eval_is_the_dense_class(name):
    sbp, dense = backbone_pair(name, sbp=dict(keep_ratio=0.5))
    assert list(sbp.state_dict()) == list(dense.state_dict())
    other_sbp, _ = backbone_pair(name, sbp=dict(keep_ratio=0.5))
    other_sbp.load_state_dict(dense.state_dict())
    dense.load_state_dict(sbp.state_dict())
    sbp.eval()
    dense.eval()
    assert not sbp.sbp_active()
    x = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        for a, b in zip(sbp(x), dense(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('pool', [
    nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),  # ResNetV1d's shortcut
    nn.AvgPool2d(3, 2, padding=1),  # Res2Net's strided last scale
    nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d(1, 1, ceil_mode=True, count_include_pad=False),
])
@pytest.mark.parametrize('height', [16, 13])
@pytest.mark.parametrize('recompute', [False, True])
@pytest.mark.parametrize('masks', [
    [True, False, False, True, True, False],
    [[True, False, False, True, True, False], [False, True, True, False, False, True]],
], ids=['shared', 'per_image'])
def test_pool_unit_is_exact_and_has_the_reference_gradients(pool, height, recompute, masks):
    torch.manual_seed(0)
    conv, pw, norm = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    program = SBPProgram([conv_unit('conv', 'input', conv, relu_after=True),
                          Unit('pool', 'conv', PoolMix(pool), (RowLocal(pw), BatchNorm(norm))),
                          Unit('out', 'pool', IdentityMix(), ())])
    iteration = SBPIteration(torch.tensor(masks), 8)
    x = torch.randn(2, 4, height, 11, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out = program(x, iteration, stride=1, recompute=recompute)
    ref = reference_program(program, ref_x, iteration, stride=1)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    params = [conv.weight, conv.bias, pw.weight, pw.bias, norm.weight, norm.bias]
    got = torch.autograd.grad(out, [x] + params, grad)
    want = torch.autograd.grad(ref, [ref_x] + params, grad)
    for name, g, w in zip(['x', 'conv.w', 'conv.b', 'pw.w', 'pw.b', 'bn.w', 'bn.b'], got, want):
        assert_grad_close(g, w, name)
    assert got[0].abs().sum() > 0


class UserBottleneck(Bottleneck):
    """A user's own block class: SBP cannot know its forward."""


@MODELS.register_module(force=True)
class UserResNetSBP(ResNetSBP):
    def make_res_layer(self, **kwargs):
        return super().make_res_layer(**dict(kwargs, block=UserBottleneck))


def test_a_block_without_sbp_version_is_refused_naming_its_class():
    with pytest.raises(TypeError, match=r'UserResNetSBP\.layer1\.0: layer class '
                                        r'.*UserBottleneck has no SBP version '
                                        r'.*resnet\.Bottleneck'):
        UserResNetSBP(depth=50, base_channels=8)
    model = UserResNetSBP(depth=50, base_channels=8, sbp=dict(stages=(0, 0, 0, 0)))
    assert not model.sbp_active()  # the blocks without SBP are not asked for it


def test_sbp_asked_of_a_dense_backbone_names_it_and_the_supported_ones():
    problem = sbp_model_problem(dict(backbone=dict(type='ResNeXt', sbp=dict(keep_ratio=0.5))))
    assert "backbone ResNeXt: the config gives it an sbp key, but use type='ResNeXtSBP'" in problem
    problem = sbp_model_problem(dict(backbone=dict(type='HRNet', extra={}), neck=dict(
        type='FPNSBP')))
    assert problem.startswith('backbone HRNet: the FPNSBP neck follows the mask of an SBP '
                              'backbone')
    assert 'HRNet has no SBP version' in problem and 'Res2Net -> Res2NetSBP' in problem
    assert sbp_model_problem(dict(backbone=dict(type='HRNet'), neck=dict(
        type='FPNSBP', sbp=dict(own_mask=True)))) is None
    assert sbp_model_problem(dict(backbone=dict(type='RegNetSBP', arch='regnetx_3.2gf'),
                                  neck=dict(type='FPNSBP'))) is None
    neck = FPNSBP(in_channels=[8, 16], out_channels=8, num_outs=2)
    neck.train()
    with pytest.raises(ValueError, match='FPNSBP: its inputs carry no SBP mask .*tuple.* must '
                                         'be an SBP backbone .*ResNeXt -> ResNeXtSBP'):
        neck((torch.rand(1, 8, 8, 8), torch.rand(1, 16, 4, 4)))


def test_train_refuses_sbp_on_a_dense_backbone_before_the_runner(tmp_path):
    """The dense demo config with an ``sbp`` key on its ``ResNet``: mmdet would raise a
    bare ``unexpected keyword argument 'sbp'``; tools/train.py names the SBP type."""
    dense_tiny = str(REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_synthetic-tiny.py')
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), dense_tiny,
                           '--cfg-options', 'model.backbone.sbp.keep_ratio=0.5'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert ("backbone ResNet: the config gives it an sbp key, but use type='ResNetSBP'"
            in proc.stderr)
    assert not (tmp_path / 'work_dirs').exists()


STOCK_CONFIGS = {  # stock config, the backbone type to swap in (and its dense type)
    'r101': ('faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py', 'ResNet'),
    'x101': ('faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py', 'ResNeXt'),
    'regnet': ('regnet/faster-rcnn_regnetx-3.2GF_fpn_1x_coco.py', 'RegNet'),
    'res2net': ('res2net/faster-rcnn_res2net-101_fpn_2x_coco.py', 'Res2Net'),
    'r50-v1d': ('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', 'ResNetV1d'),
    'retina-x101': ('retinanet/retinanet_x101-32x4d_fpn_1x_coco.py', 'ResNeXt'),
    'mask-rcnn': ('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', 'ResNet'),
    'cascade': ('cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py', 'ResNet'),
    'atss': ('atss/atss_r50_fpn_1x_coco.py', 'ResNet'),
    'fcos': ('fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', 'ResNet'),
}
TINY_BACKBONE = {'ResNet': dict(depth=50, base_channels=8),
                 'ResNetV1d': dict(depth=50, base_channels=8),
                 'ResNeXt': dict(depth=50, groups=4, base_width=4, base_channels=8),
                 'RegNet': dict(arch=TINY_REGNET, stem_channels=8, base_channels=8),
                 'Res2Net': dict(depth=50, scales=4, base_width=4, base_channels=8)}
CHANNEL_KEYS = ('in_channels', 'feat_channels', 'out_channels', 'conv_out_channels',
                'fc_out_channels')


def shrink_channels(cfg):
    """Every head width of 256 or more down to 32 (GroupNorm(32) still fits)."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if key in CHANNEL_KEYS and isinstance(value, int) and value >= 256:
                cfg[key] = 32
            else:
                shrink_channels(value)
    elif isinstance(cfg, list):
        for item in cfg:
            shrink_channels(item)


def tiny_stock_model(config, dense_type, sbp):
    """The stock config's model, tiny and random, its backbone (and FPN) swapped to SBP."""
    cfg = get_config(f'mmdet::{config}').model
    backbone = dict(TINY_BACKBONE[dense_type], type=dense_type, init_cfg=None,
                    frozen_stages=cfg.backbone.get('frozen_stages', -1),
                    norm_cfg=cfg.backbone.get('norm_cfg', dict(type='BN')),
                    norm_eval=cfg.backbone.get('norm_eval', True),
                    style=cfg.backbone.get('style', 'pytorch'))
    if dense_type in ('RegNet', 'Res2Net'):
        backbone.pop('style')
    dense_backbone = MODELS.build(backbone)
    dense_backbone.eval()
    with torch.no_grad():
        channels = [o.shape[1] for o in dense_backbone(torch.rand(1, 3, 64, 64))]
    shrink_channels(cfg)
    cfg.backbone = backbone
    cfg.neck.in_channels = channels
    if sbp:
        cfg.backbone.update(type=f'{dense_type}SBP', sbp=dict(keep_ratio=0.5, sampling='grid'))
        cfg.neck.type = 'FPNSBP'
    return cfg


@pytest.mark.parametrize('name', list(STOCK_CONFIGS))
def test_swapping_the_backbone_of_stock_configs_trains_with_the_dense_loss(name):
    config, dense_type = STOCK_CONFIGS[name]
    sbp_cfg = tiny_stock_model(config, dense_type, sbp=True)
    assert sbp_model_problem(sbp_cfg) is None
    sbp_model = build_detector(sbp_cfg)
    dense = build_detector(tiny_stock_model(config, dense_type, sbp=False))
    dense.load_state_dict(sbp_model.state_dict())
    assert type(sbp_model.backbone).__name__ == f'{dense_type}SBP'
    torch.manual_seed(0)
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 96, 128), (3, 77, 101)],
                            num_items=[4, 4], num_classes=3, with_mask=name == 'mask-rcnn')
    data = sbp_model.data_preprocessor(packed, True)
    loss = total_loss(sbp_model, data)
    assert sbp_model.backbone.sbp_iteration.keep_ratio == 0.5
    with torch.no_grad():
        torch.testing.assert_close(loss, total_loss(dense, data), rtol=0, atol=0)
    loss.backward()
    grads = [p.grad for p in sbp_model.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert not math.isnan(loss.item())


@pytest.mark.parametrize('config,backbone,head', [
    ('faster_rcnn_x101_32x4d_sbp.py', ResNeXtSBP, 'RPNHead'),
    ('retinanet_x101_32x4d_sbp.py', ResNeXtSBP, 'RetinaHead'),
    ('faster_rcnn_regnetx_3.2gf_sbp.py', RegNetSBP, 'RPNHead'),
])
def test_configs_build_the_stock_model_with_sbp_backbone_and_neck(config, backbone, head):
    cfg = Config.fromfile(str(REPO / 'configs' / config))
    assert cfg.custom_hooks == [dict(type='SBPHook')] and sbp_model_problem(cfg.model) is None
    model = MODELS.build(cfg.model)
    assert type(model.backbone) is backbone and isinstance(model.neck, FPNSBP)
    assert model.backbone.sbp_blocks[1] == [True] * len(model.backbone.sbp_blocks[1])
    assert not any(model.backbone.sbp_blocks[0]) and not any(model.backbone.sbp_blocks[3])
    heads = [type(getattr(model, name, None)).__name__ for name in ('rpn_head', 'bbox_head')]
    assert head in heads


@pytest.mark.slow
def test_x101_config_trains_one_iteration_on_the_synthetic_set(workspace, tmp_path):
    """tools/train.py on configs/faster_rcnn_x101_32x4d_sbp.py (the full-width X101,
    random init) with the tiny synthetic data, loop and logging of the tests' config."""
    cfg = Config.fromfile(str(REPO / 'configs' / 'faster_rcnn_x101_32x4d_sbp.py'))
    for key in ('train_dataloader', 'param_scheduler', 'default_hooks', 'log_processor'):
        cfg[key] = TINY_DATA_CFG[key]
    cfg.train_cfg = dict(TINY_DATA_CFG.train_cfg, max_iters=1, val_interval=10)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.model.backbone.init_cfg = None
    cfg.model.roi_head.bbox_head.num_classes = TINY_DATA_CFG.model.roi_head.bbox_head.num_classes
    config = tmp_path / 'x101_tiny.py'
    cfg.dump(str(config))
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), str(config),
                           '--work-dir', str(tmp_path / 'work')], cwd=workspace,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / 'work' / 'iter_1.pth').exists()
    keep = cfg.model.backbone.sbp.keep_ratio  # SBPHook logged the SBP step at the config's ratio
    assert f'sbp/keep_ratio: {keep}' in proc.stdout + proc.stderr
