"""Every SBP module takes its mmdet class's arguments in that class's order, plus a
keyword-only ``sbp``: the positional forms of mmdet's own tests (``ResNet(50)``,
``RegNet('regnetx_400mf')``, ...) build the same module and train with SBP."""
import inspect
from typing import List, Sequence

import pytest
import torch
from mmcv.cnn import ConvModule
from mmdet.models.backbones import RegNet, Res2Net, ResNet, ResNetV1d, ResNeXt, SwinTransformer
from mmdet.models.dense_heads import RetinaHead, RPNHead
from mmdet.models.necks import FPN
from torch import Tensor, nn

from sbp_mmdet.models import (FPNSBP, ConvNeXtSBP, RegNetSBP, Res2NetSBP, ResNetSBP, ResNetV1dSBP,
                              ResNeXtSBP, RetinaHeadSBP, RPNHeadSBP, SwinTransformerSBP)
from sbp_mmdet.models.backbones.mmpretrain_convnext import ConvNeXt
from sbp_mmdet.models.layers import SBPConvModule
from sbp_mmdet.sbp import SBPFeatures

SBP_CLASSES = {  # SBP class -> the class it adds SBP to
    ResNetSBP: ResNet, ResNetV1dSBP: ResNetV1d, ResNeXtSBP: ResNeXt, RegNetSBP: RegNet,
    Res2NetSBP: Res2Net, ConvNeXtSBP: ConvNeXt, SwinTransformerSBP: SwinTransformer, FPNSBP: FPN,
    RPNHeadSBP: RPNHead, RetinaHeadSBP: RetinaHead,
}
CLASS_IDS = [cls.__name__ for cls in SBP_CLASSES]


@pytest.mark.parametrize('sbp_cls', list(SBP_CLASSES), ids=CLASS_IDS)
def test_signature_is_the_mmdet_class_signature_plus_a_keyword_only_sbp(sbp_cls):
    dense_cls = SBP_CLASSES[sbp_cls]
    assert dense_cls in sbp_cls.__bases__
    params = list(inspect.signature(sbp_cls).parameters.values())
    sbp = inspect.signature(sbp_cls).parameters['sbp']
    assert sbp.kind is inspect.Parameter.KEYWORD_ONLY and sbp.default is None
    assert [p for p in params if p.name != 'sbp'] == list(
        inspect.signature(dense_cls).parameters.values())


def test_sbp_conv_module_takes_conv_module_arguments_and_no_sbp():
    """``SBPConvModule`` is adopted by its SBP module (``adopt``), which owns the
    settings: its own arguments are ``ConvModule``'s, positional ones included."""
    assert inspect.signature(SBPConvModule) == inspect.signature(ConvModule)
    module, dense = SBPConvModule(4, 8, 3, 1, 1), ConvModule(4, 8, 3, 1, 1)
    dense.load_state_dict(module.state_dict())
    x = torch.rand(1, 4, 8, 8)
    assert torch.equal(module(x), dense(x))


def test_an_instance_signature_is_its_call_not_the_class_signature():
    assert inspect.signature(ResNetSBP(18, base_channels=2)) == inspect.signature(
        ResNet(18, base_channels=2))


class _Received(Exception):
    """Raised by a stand-in ``__init__`` with the arguments it received."""


@pytest.mark.parametrize('sbp_cls', list(SBP_CLASSES), ids=CLASS_IDS)
def test_positional_arguments_reach_the_mmdet_class_unchanged_and_in_order(sbp_cls, monkeypatch):
    """Whatever the SBP class's own ``__init__`` does, the mmdet class receives
    every positional argument, in order, and no ``sbp``."""
    dense_cls = SBP_CLASSES[sbp_cls]
    positional = [p for p in inspect.signature(dense_cls).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    def received(self, *args, **kwargs):
        raise _Received(args, kwargs)
    monkeypatch.setattr(dense_cls, '__init__', received)
    args = tuple(object() for _ in positional)
    with pytest.raises(_Received) as info:
        sbp_cls(*args, sbp=dict(keep_ratio=0.5))
    assert info.value.args == (args, {})


def _train_step(modules: Sequence[nn.Module], x: Tensor) -> tuple:
    """Run ``modules`` in a chain in train mode and back-propagate the sum of
    the last one's outputs; those outputs, and the same flattened to tensors."""
    for module in modules:
        module.train()
    outs = x
    for module in modules:
        outs = module(outs)
    flat = [o for out in outs for o in (out if isinstance(out, list) else [out])]
    sum(o.sum() for o in flat).backward()
    return outs, flat


# (SBP class, dense class, args, kwargs): the forms of mmdet's tests
# (tests/test_models/test_backbones), shrunk with base_channels where they shrink
BACKBONE_FORMS = [
    (ResNetSBP, ResNet, (50,), {}),
    (ResNetSBP, ResNet, (18,), {}),
    (ResNetSBP, ResNet, (18,), dict(with_cp=True)),
    (ResNetSBP, ResNet, (50,), dict(base_channels=1)),
    (ResNetSBP, ResNet, (50,), dict(base_channels=3)),
    (ResNetSBP, ResNet, (50,), dict(stem_channels=3, base_channels=2)),
    (ResNetSBP, ResNet, (50,), dict(frozen_stages=1, base_channels=1)),
    (ResNetSBP, ResNet, (50,), dict(out_indices=(0, 1, 2), base_channels=1)),
    (ResNetSBP, ResNet, (50,), dict(with_cp=True, base_channels=1)),
    (ResNetSBP, ResNet, (50,), dict(norm_eval=True, base_channels=1)),
    (ResNetSBP, ResNet, (50,), dict(zero_init_residual=True, base_channels=1)),
    (ResNetSBP, ResNet, (18, 3, 16, 16, 4), {}),  # depth, in/stem/base channels, stages
    (ResNetV1dSBP, ResNetV1d, (), dict(depth=50, base_channels=2)),
    (ResNetV1dSBP, ResNetV1d, (), dict(depth=50, stem_channels=6)),
    (ResNeXtSBP, ResNeXt, (), dict(depth=50, groups=32, base_width=4)),
    (ResNeXtSBP, ResNeXt, (32, 4), dict(depth=50)),  # ResNeXt's own order: groups, base_width
    (Res2NetSBP, Res2Net, (), dict(depth=50, scales=4, base_width=26)),
    (Res2NetSBP, Res2Net, (4, 26), dict(depth=50)),  # Res2Net's order: scales, base_width
    (RegNetSBP, RegNet, ('regnetx_400mf',), {}),
    (RegNetSBP, RegNet, (dict(w0=24, wa=24.48, wm=2.54, group_w=16, depth=22, bot_mul=1.0),), {}),
    (RegNetSBP, RegNet, ('regnetx_400mf', 3, 16, 16), {}),  # arch, in/stem/base channels
    (ConvNeXtSBP, ConvNeXt, (dict(depths=[1, 1, 2, 1], channels=[8, 16, 24, 32]),),
     dict(out_indices=(0, 1, 2, 3), gap_before_final_norm=False)),
    # pretrain_img_size, in_channels, embed_dims, patch_size, window_size (no DropPath: the
    # two modules draw from one generator in turn)
    (SwinTransformerSBP, SwinTransformer, (224, 3, 16, 4, 7),
     dict(depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), drop_path_rate=0.0)),
    (SwinTransformerSBP, SwinTransformer, (224, 3, 16), dict(
        depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), drop_path_rate=0.0, with_cp=True,
        frozen_stages=1)),
]


def _form_id(form) -> str:
    sbp_cls, _, args, kwargs = form
    shown = [repr(a) if not isinstance(a, dict) else 'arch' for a in args]
    return f"{sbp_cls.__name__}({', '.join(shown + [f'{k}={v!r}' for k, v in kwargs.items()])})"


def _same_module(sbp: nn.Module, dense: nn.Module) -> None:
    """The SBP module is the mmdet module built from the same arguments: same
    parameter names and shapes; ``dense`` takes its weights."""
    assert {k: v.shape for k, v in sbp.state_dict().items()} == {
        k: v.shape for k, v in dense.state_dict().items()}
    dense.load_state_dict(sbp.state_dict())


@pytest.mark.parametrize('form', BACKBONE_FORMS, ids=[_form_id(f) for f in BACKBONE_FORMS])
def test_mmdet_backbone_forms_build_the_mmdet_backbone_and_train_with_sbp(form):
    sbp_cls, dense_cls, args, kwargs = form
    torch.manual_seed(0)
    sbp, dense = sbp_cls(*args, **kwargs), dense_cls(*args, **kwargs)
    _same_module(sbp, dense)
    x = torch.rand(2, 3, 64, 64)
    outs, flat = _train_step([sbp], x)
    assert isinstance(outs, SBPFeatures) and sbp.sbp_active()
    assert sbp.sbp_iteration.keep_ratio == 0.5  # the default sbp: rows were dropped
    for out, ref in zip(flat, _train_step([dense], x)[1]):
        torch.testing.assert_close(out, ref)  # the forward is the mmdet module's
    sbp_stage_params = [p for stage, switches in zip(_stages(sbp), sbp.sbp_blocks)
                        if any(switches) for p in stage.parameters()]
    assert sbp_stage_params and all(p.grad is not None for p in sbp_stage_params)


def _stages(backbone: nn.Module) -> List[nn.Module]:
    if hasattr(backbone, 'res_layers'):
        return [getattr(backbone, name) for name in backbone.res_layers]
    return list(backbone.stages)


def test_resnext_positional_depth_fails_as_it_does_for_resnext():
    """``ResNeXt``'s first parameter is ``groups`` (depth goes by keyword), so
    ``ResNeXt(101, groups=32, base_width=4)`` is an error in mmdet: the SBP
    class refuses it with mmdet's own message."""
    with pytest.raises(TypeError) as dense_error:
        ResNeXt(101, groups=32, base_width=4)
    with pytest.raises(TypeError) as sbp_error:
        ResNeXtSBP(101, groups=32, base_width=4)
    assert str(sbp_error.value) == str(dense_error.value)
    assert "multiple values for argument 'groups'" in str(sbp_error.value)


# neck and head forms: positional as in their mmdet signatures
CHANNELS = [16, 32, 64, 128]  # those of ResNet(18, 3, 16, 16)
NECK_HEAD_FORMS = {
    'FPNSBP(in_channels, out_channels, num_outs)': (
        lambda: FPNSBP(CHANNELS, 8, 5), lambda: FPN(CHANNELS, 8, 5), None, None),
    'RPNHeadSBP(in_channels, num_classes)': (
        lambda: FPNSBP(CHANNELS, 8, 5), lambda: FPN(CHANNELS, 8, 5),
        lambda: RPNHeadSBP(8, 1), lambda: RPNHead(8, 1)),
    'RetinaHeadSBP(num_classes, in_channels, stacked_convs)': (
        lambda: FPNSBP(CHANNELS, 8, 5), lambda: FPN(CHANNELS, 8, 5),
        lambda: RetinaHeadSBP(3, 8, 2), lambda: RetinaHead(3, 8, 2)),
}


@pytest.mark.parametrize('form', list(NECK_HEAD_FORMS))
def test_positional_neck_and_head_forms_build_the_mmdet_module_and_train_with_sbp(form):
    neck_of, dense_neck_of, head_of, dense_head_of = NECK_HEAD_FORMS[form]
    torch.manual_seed(0)
    backbone = ResNetSBP(18, 3, 16, 16)  # depth, in_channels, stem_channels, base_channels
    dense_backbone = ResNet(18, 3, 16, 16)
    sbp_chain: List[nn.Module] = [backbone, neck_of()]
    dense_chain: List[nn.Module] = [dense_backbone, dense_neck_of()]
    if head_of is not None:
        sbp_chain.append(head_of())
        dense_chain.append(dense_head_of())
    for sbp, dense in zip(sbp_chain, dense_chain):
        _same_module(sbp, dense)
    x = torch.rand(2, 3, 64, 64)
    outs, flat = _train_step(sbp_chain, x)
    for out, ref in zip(flat, _train_step(dense_chain, x)[1]):
        torch.testing.assert_close(out, ref)
    module = sbp_chain[-1]
    assert module.sbp_iteration is backbone.sbp_iteration  # it followed the backbone's mask
    assert module.sbp_iteration.keep_ratio == 0.5
    assert all(p.grad is not None for p in module.parameters())
