"""The one layer mechanism: adoption, programs built once, mode checks once per ``.train()``,
and ``with_cp`` against ``sbp.recompute``."""
import sys
import warnings

import pytest
import torch
from mmdet.models.backbones.resnet import BasicBlock
from torch import nn

import sbp_mmdet  # noqa: F401
from sbp_mmdet.models import ConvNeXtSBP, ResNetSBP, RPNHeadSBP, SBPConvModule, SwinTransformerSBP
from sbp_mmdet.models.backbones import SBPBasicBlock
from sbp_mmdet.sbp import SBPLayerMixin, SBPProgram
from sbp_mmdet.sbp.layer import adopt

from sbp_builders import build_detector, faster_rcnn_cfg, preprocessed_batch


def train_step(model: nn.Module, data: dict) -> None:
    losses = model(**data, mode='loss')
    model.parse_losses(losses)[0].backward()


def sbp_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, SBPLayerMixin)]


def test_each_program_is_built_once_not_per_training_forward(monkeypatch):
    """Backbone blocks, FPN convs and the SBP RPN head: every program is built
    when the model is (structural checks at build time), none in training."""
    builds = []
    for cls in (SBPBasicBlock, SBPConvModule, RPNHeadSBP):
        build = cls.build_sbp_program
        monkeypatch.setattr(cls, 'build_sbp_program',
                            lambda self, build=build: builds.append(self) or build(self))
    model = build_detector(faster_rcnn_cfg(True))
    layers = sbp_layers(model)
    assert sorted(map(id, builds)) == sorted(map(id, layers + [model.rpn_head]))
    builds.clear()
    model.train()
    data = preprocessed_batch(model, [(64, 96)] * 2)
    for _ in range(2):
        train_step(model, data)
    assert builds == [] and model.backbone.sbp_iteration.keep_ratio == 0.5


def test_a_program_is_rebuilt_when_a_layer_submodule_is_replaced():
    """E.g. BatchNorm converted to SyncBatchNorm after the model is built: the
    program must run the new module, not the old one."""
    model = ResNetSBP(18, norm_eval=False, sbp=dict(keep_ratio=0.5))
    block = model.layer2[0]
    old = block.sbp_program()
    assert block.sbp_program() is old
    new_norm = nn.BatchNorm2d(block.norm1.num_features)
    new_norm.load_state_dict(block.norm1.state_dict())
    setattr(block, block.norm1_name, new_norm)
    assert block.sbp_program() is not old
    model.train()
    sum(o.sum() for o in model(torch.rand(2, 3, 64, 64))).backward()
    assert new_norm.weight.grad is not None and new_norm.weight.grad.abs().sum() > 0


def test_modes_are_checked_once_per_train_at_the_first_training_forward(monkeypatch):
    checks = []
    check = SBPProgram.check_modes
    monkeypatch.setattr(SBPProgram, 'check_modes',
                        lambda self, exact=False: checks.append(self) or check(self, exact))
    model = ResNetSBP(18, norm_eval=True, sbp=dict(keep_ratio=0.5, exact_input_grad=True))
    model.train()  # norm_eval puts BatchNorm in eval mode after the children's train()
    x = torch.rand(2, 3, 64, 64)
    for _ in range(2):
        model(x)
    assert len(checks) == len(model.sbp_adopted) == 6  # layer1-3, two blocks each
    model.train()
    model(x)
    assert len(checks) == 12
    model.eval()
    model(x)  # no training forward: nothing checked
    assert len(checks) == 12


def test_exact_input_grad_with_train_mode_batchnorm_fails_at_the_first_training_forward():
    model = ResNetSBP(18, norm_eval=False, sbp=dict(keep_ratio=0.5, exact_input_grad=True))
    model.train()
    with pytest.raises(TypeError, match=r'ResNetSBP\.layer1\.0\.conv1: exact input gradients need '
                                        r'BatchNorm in eval mode'):
        model(torch.rand(2, 3, 64, 64))


def test_with_cp_checkpoints_the_dense_blocks_and_sbp_recompute_the_sbp_ones():
    """One switch per thing: ``with_cp`` is mmdet's checkpointing of the blocks
    that run densely; SBP blocks recompute with ``sbp.recompute`` alone."""
    with pytest.warns(UserWarning, match=r"ResNetSBP: with_cp=True checkpoints the blocks that "
                                         r"run densely; the SBP blocks \(ResNetSBP\.layer1\.0, "
                                         r"\.\.\.\) store their kept rows: add "
                                         r"sbp.recompute=True"):
        model = ResNetSBP(18, with_cp=True, sbp=dict(keep_ratio=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model = ResNetSBP(18, with_cp=True, sbp=dict(keep_ratio=0.5, recompute=True))
        ConvNeXtSBP(arch='atto', gap_before_final_norm=False, with_cp=True,
                    sbp=dict(recompute='all'))
    assert [type(b) for b in model.layer4] == [BasicBlock] * 2  # dense: mmdet's own block
    assert all(b.with_cp for b in model.layer4)
    assert all(layer.sbp_cfg.recompute is True for layer in model.sbp_adopted)


def test_adopt_refuses_a_module_of_another_class_naming_it():
    conv = nn.Conv2d(3, 3, 3)
    with pytest.raises(TypeError, match=r'Net\.conv: layer class torch.nn.modules.conv.Conv2d '
                                        r'has no SBP version here'):
        adopt(conv, (SBPBasicBlock,), 'Net.conv', ResNetSBP(18).sbp_cfg)
    assert type(conv) is nn.Conv2d


def test_every_sbp_layer_class_is_a_named_module_attribute():
    """Models pickle and classes are found by name: no classes made at run time."""
    model = build_detector(faster_rcnn_cfg(True))
    layers = sbp_layers(model) + sbp_layers(ConvNeXtSBP(arch='atto', gap_before_final_norm=False))
    swin = SwinTransformerSBP(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    layers += sbp_layers(swin) + [block.attn.w_msa for block, _ in swin.sbp_layer_inputs
                                  if hasattr(block, 'attn')]
    assert {type(m).__name__ for m in layers} >= {'SBPSwinBlock', 'SBPPatchMerging',
                                                  'SBPWindowMSA'}
    for cls in {type(m) for m in layers}:
        assert getattr(sys.modules[cls.__module__], cls.__qualname__) is cls
