"""ResNetSBP and FPNSBP: drop-in, exact forward, reference gradients, less memory."""
import re

import pytest
import torch
from mmdet.models.backbones import ResNet
from mmdet.models.necks import FPN
from mmdet.registry import MODELS
from mmengine.config import Config
from torch import nn

import sbp_mmdet  # noqa: F401
from sbp_mmdet.models import FPNSBP, ResNetSBP, RetinaHeadSBP, RPNHeadSBP
from sbp_mmdet.sbp import SavedTensorMeter, SBPFeatures

from sbp_builders import build_detector, preprocessed_batch, resnet_pair, small_faster_rcnn_cfg
from sbp_reference import (STRIDES, add_reference_hooks, assert_grad_close, assert_grads_match,
                           assert_matches_reference, backward_both, enabled_blocks,
                           stride_from_height, total_loss, weight_masking_hook)


def assert_resnet_matches_reference(sbp, dense, x):
    """``sbp(x)`` equals ``dense(x)``; its gradients equal those of ``dense`` with
    the reference masks of SBP's iteration."""
    outs = sbp(x)
    iteration = sbp.sbp_iteration
    assert iteration is not None
    add_reference_hooks(enabled_blocks(dense, sbp.sbp_blocks), iteration, x.shape[2])
    ref_outs = dense(x)
    backward_both(outs, ref_outs)
    for o, r in zip(outs, ref_outs):
        torch.testing.assert_close(o, r)
    assert_grads_match(sbp, dense)


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('norm_eval', [False, True])
@pytest.mark.parametrize('size', [
    (64, 96), (61, 45), (33, 40),
    (32, 448), (448, 32),  # extreme aspect ratios
    (20, 28),  # the stride-32 map is 1x1
])
def test_resnet_sbp_forward_equals_resnet_and_gradients_equal_the_reference(
        depth, norm_eval, size):
    sbp, dense = resnet_pair(depth, norm_eval=norm_eval, frozen_stages=-1,
                             sbp=dict(keep_ratio=0.5, sampling='random', stages=(1, 1, 1, 0)))
    assert_resnet_matches_reference(sbp, dense, torch.rand(2, 3, *size))


def test_syncbn_runs_sbp_with_norm_eval_and_is_refused_in_train_mode():
    sbp, dense = resnet_pair(18, norm_cfg=dict(type='SyncBN'), norm_eval=True, frozen_stages=-1,
                             sbp=dict(keep_ratio=0.5, sampling='random'))
    assert sbp.sbp_active()
    assert_resnet_matches_reference(sbp, dense, torch.rand(2, 3, 64, 64))
    sbp.norm_eval = False
    sbp.train()
    with pytest.raises(NotImplementedError,
                       match='SyncBN in train mode is not supported.*use BN, or norm_eval=True'):
        sbp(torch.rand(2, 3, 64, 64))


def test_exact_input_grad_needs_norm_eval_and_names_the_norm_at_the_first_forward():
    """Its structure is checked at build time; BatchNorm's mode, which ``norm_eval``
    sets in ``train()``, at each training forward."""
    sbp, _ = resnet_pair(18, frozen_stages=-1, norm_eval=False,
                         sbp=dict(keep_ratio=0.5, exact_input_grad=True))
    with pytest.raises(TypeError, match=r'ResNetSBP\.layer1\.0\.conv1: exact input gradients '
                                        r'need BatchNorm in eval mode'):
        sbp(torch.rand(2, 3, 64, 64))


def test_r_equal_one_and_eval_mode_are_plain_resnet():
    sbp, dense = resnet_pair(18, frozen_stages=-1, norm_eval=True, sbp=dict(keep_ratio=1.0))
    x = torch.rand(2, 3, 64, 64)
    assert not sbp.sbp_active()
    for a, b in zip(sbp(x), dense(x)):
        assert torch.equal(a, b)
    sbp, dense = resnet_pair(50, sbp=dict(keep_ratio=0.5))
    sbp.eval()
    dense.eval()
    assert not sbp.sbp_active()
    with torch.no_grad():
        for a, b in zip(sbp(x), dense(x)):
            assert torch.equal(a, b)
    sbp.train()
    with torch.no_grad():
        assert not sbp.sbp_active()


def test_state_dicts_are_interchangeable():
    torch.manual_seed(0)
    dense = ResNet(depth=50)
    sbp = ResNetSBP(depth=50)
    sbp.load_state_dict(dense.state_dict(), strict=True)
    dense.load_state_dict(sbp.state_dict(), strict=True)
    fpn = FPN(in_channels=[256, 512, 1024, 2048], out_channels=64, num_outs=5)
    fpn_sbp = FPNSBP(in_channels=[256, 512, 1024, 2048], out_channels=64, num_outs=5)
    fpn_sbp.load_state_dict(fpn.state_dict(), strict=True)
    fpn.load_state_dict(fpn_sbp.state_dict(), strict=True)


def test_default_stages_follow_the_paper_and_skip_frozen_stages():
    assert ResNetSBP(depth=50, frozen_stages=1).sbp_blocks == [[False] * 3, [True] * 4,
                                                               [True] * 6, [False] * 3]
    assert ResNetSBP(depth=18, frozen_stages=-1).sbp_blocks == [[True] * 2] * 3 + [[False] * 2]


@pytest.mark.parametrize('kwargs,error', [
    (dict(frozen_stages=1, sbp=dict(stages=(1, 1, 0, 0))),
     'SBP asked on frozen stage\\(s\\) \\[0\\]'),
    (dict(sbp=dict(stages=(1, 1))), 'sbp.stages must have 4 entries'),
    (dict(sbp=dict(blocks=[[1], [1], [1], [1]])), 'sbp.blocks must have 4 lists of lengths'),
    (dict(sbp=dict(stages=(0, 1, 1, 0), blocks=[[0] * 3] * 4)), 'not both'),
    (dict(sbp=dict(keep_ratio=0)), 'keep_ratio must be in'),
    (dict(sbp=dict(sampling='diag')), 'sampling must be one of'),
    (dict(sbp=dict(keep_rate=0.5)), "unknown key\\(s\\) \\['keep_rate'\\]"),
    (dict(norm_cfg=dict(type='IN')),
     'layer1.0.downsample: SBP supports BatchNorm .* and GroupNorm .*got InstanceNorm2d'),
    (dict(dcn=dict(type='DCN', deform_groups=1), stage_with_dcn=(False, True, False, False)),
     'layer2.0: SBP does not support DCN'),
])
def test_bad_backbone_configs_are_refused_clearly(kwargs, error):
    with pytest.raises((ValueError, TypeError, KeyError), match=error):
        ResNetSBP(depth=50, **kwargs)


def test_fpn_sbp_refuses_an_unsupported_norm_naming_the_layer():
    with pytest.raises(TypeError, match=r'FPNSBP\.lateral_convs\.0: SBP supports BatchNorm .*'
                                        'got InstanceNorm2d'):
        FPNSBP(in_channels=[64, 128], out_channels=32, num_outs=2, norm_cfg=dict(type='IN'))


@pytest.mark.parametrize('config', ['configs/faster_rcnn_r50_sbp.py',
                                    'configs/retinanet_r50_sbp.py',
                                    'configs/faster_rcnn_r50_sbp_heads.py',
                                    'configs/retinanet_r50_sbp_heads.py',
                                    'configs/faster_rcnn_r50_sbp_lowmem.py'])
def test_configs_build(config):
    from mmdet.registry import MODELS
    cfg = Config.fromfile(config)
    model = MODELS.build(cfg.model)
    assert isinstance(model.backbone, ResNetSBP) and isinstance(model.neck, FPNSBP)
    head = model.rpn_head if hasattr(model, 'rpn_head') else model.bbox_head
    sbp_heads = config.endswith(('_heads.py', '_lowmem.py'))
    assert isinstance(head, (RPNHeadSBP, RetinaHeadSBP)) == sbp_heads
    if sbp_heads:  # the towers recompute: they store their inputs alone
        assert head.sbp_cfg.recompute == 'all'
    if config.endswith('_lowmem.py'):  # SBP + with_cp: both keys, both FPN conv groups
        assert model.backbone.with_cp and model.backbone.sbp_cfg.recompute is True
        assert cfg.model.backbone.sbp.keep_ratio == 0.5
        assert model.neck.sbp_conv_groups == ('lateral_convs', 'fpn_convs')
    assert model.backbone.sbp_blocks[1] == [True] * 4 and not any(model.backbone.sbp_blocks[3])


def test_lowmem_config_trains_with_the_dense_forward():
    """The lowest-memory composition (keep 0.5, with_cp + recompute, SBP neck output convs and
    RPN head) computes in training the features and RPN outputs of mmdet's dense modules."""
    from mmdet.registry import MODELS

    from sbp_mmdet.benchmark import random_init, variant_model
    from sbp_mmdet.variants import parse_variant
    cfg = Config.fromfile('configs/faster_rcnn_r50_sbp_lowmem.py')
    torch.manual_seed(0)
    sbp = MODELS.build(random_init(cfg.model)).train()
    dense = MODELS.build(variant_model(cfg.model, parse_variant('dense'))).train()
    dense.load_state_dict(sbp.state_dict())
    assert isinstance(sbp.rpn_head, RPNHeadSBP) and not isinstance(dense.rpn_head, RPNHeadSBP)
    images = torch.randn(2, 3, 128, 192, requires_grad=True)
    feats, dense_feats = sbp.extract_feat(images), dense.extract_feat(images)
    for ours, theirs in zip(feats, dense_feats):
        torch.testing.assert_close(ours, theirs)
    for ours, theirs in zip(sbp.rpn_head(feats), dense.rpn_head(dense_feats)):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
    sum(f.sum() for f in feats).backward()  # the composition's backward runs
    assert images.grad is not None


@pytest.mark.parametrize('shapes', [
    [(96, 128)] * 2, [(80, 72)] * 2,
    [(37, 53), (61, 29)],  # padded to one size
    [(32, 448)] * 2, [(448, 32)] * 2,  # extreme aspect ratios
])
def test_whole_detector_loss_is_exact_and_gradients_equal_the_reference(shapes):
    sbp_model = build_detector(small_faster_rcnn_cfg(True))
    dense = build_detector(small_faster_rcnn_cfg(False))
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, shapes)
    loss = total_loss(sbp_model, data)
    iteration = sbp_model.backbone.sbp_iteration
    assert iteration.base_stride == 16
    height = data['inputs'].shape[2]
    units = enabled_blocks(dense.backbone, sbp_model.backbone.sbp_blocks)
    for i, stride in enumerate((4, 8, 16, 32)):
        if iteration.covers(stride):  # the neck's SBP conv groups (sbp.convs)
            units += [getattr(dense.neck, kind)[i] for kind in sbp_model.neck.sbp_conv_groups]
    add_reference_hooks(units, iteration, height)
    assert_matches_reference(sbp_model, dense, data, loss)


def test_group_norm_backbone_and_neck_are_exact_with_the_reference_gradients():
    """GroupNorm in every backbone and neck conv (mmdet's ``gn-all`` configs): per-image
    group statistics of the full map, their gradient term exact at the kept rows."""
    gn = dict(type='GN', num_groups=8, requires_grad=True)
    cfgs = [small_faster_rcnn_cfg(sbp) for sbp in (True, False)]
    for cfg in cfgs:
        cfg.backbone.norm_cfg = cfg.neck.norm_cfg = gn
    cfgs[0].neck.sbp = dict(convs=('lateral', 'output'))
    sbp_model, dense = build_detector(cfgs[0]), build_detector(cfgs[1])
    assert isinstance(sbp_model.backbone.layer2[0].norm1, nn.GroupNorm)
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, [(96, 128)] * 2)
    loss = total_loss(sbp_model, data)
    iteration = sbp_model.backbone.sbp_iteration
    units = enabled_blocks(dense.backbone, sbp_model.backbone.sbp_blocks)
    units += [group[i] for group in (dense.neck.lateral_convs, dense.neck.fpn_convs)
              for i, stride in enumerate((4, 8, 16, 32)) if iteration.covers(stride)]
    add_reference_hooks(units, iteration, data['inputs'].shape[2])
    assert_matches_reference(sbp_model, dense, data, loss)


@pytest.mark.parametrize('convs', [('lateral',), ('output',), ('lateral', 'output')])
def test_neck_convs_choose_which_neck_convs_use_sbp(convs):
    """``sbp.convs`` of FPNSBP: the chosen conv group follows the mask, the other
    runs densely; the detector still equals the where/detach reference."""
    cfg = small_faster_rcnn_cfg(True)
    cfg.neck.sbp = dict(convs=convs)
    sbp_model = build_detector(cfg)
    dense = build_detector(small_faster_rcnn_cfg(False))
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, [(96, 128)] * 2)
    loss = total_loss(sbp_model, data)
    iteration = sbp_model.backbone.sbp_iteration
    units = enabled_blocks(dense.backbone, sbp_model.backbone.sbp_blocks)
    groups = [{'lateral': dense.neck.lateral_convs, 'output': dense.neck.fpn_convs}[c]
              for c in convs]
    units += [group[i] for group in groups for i, stride in enumerate((4, 8, 16, 32))
              if iteration.covers(stride)]
    add_reference_hooks(units, iteration, data['inputs'].shape[2])
    assert_matches_reference(sbp_model, dense, data, loss)


@pytest.mark.parametrize('shapes', [[(96, 128)] * 2, [(37, 53), (61, 29)]])
def test_output_convs_with_exact_input_grad_equal_their_reference(shapes):
    """``exact_input_grad=('output',)``: the output convs' weights learn on kept
    rows, their inputs (the top-down path, the laterals, the backbone) get
    every row's gradient; the whole detector equals that reference."""
    cfg = small_faster_rcnn_cfg(True)
    cfg.neck.sbp = dict(convs=('lateral', 'output'),
                        overrides=dict(output=dict(exact_input_grad=True)))
    sbp_model = build_detector(cfg)
    dense = build_detector(small_faster_rcnn_cfg(False))
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, shapes)
    loss = total_loss(sbp_model, data)
    iteration = sbp_model.backbone.sbp_iteration
    height = data['inputs'].shape[2]
    covered = [i for i, stride in enumerate(STRIDES) if iteration.covers(stride)]
    add_reference_hooks(enabled_blocks(dense.backbone, sbp_model.backbone.sbp_blocks)
                        + [dense.neck.lateral_convs[i] for i in covered], iteration, height)
    hook = weight_masking_hook(iteration, stride_from_height(height))
    for i in covered:
        dense.neck.fpn_convs[i].conv.register_forward_hook(hook)
    assert_matches_reference(sbp_model, dense, data, loss)


@pytest.mark.parametrize('shapes', [[(96, 128)] * 2, [(37, 53), (61, 29)]])
def test_exact_input_grad_everywhere_gives_the_dense_gradient_to_every_activation(shapes):
    """Backbone (norm_eval), neck and RPN head with ``exact_input_grad``: no
    gradient path is cut, so the image, the dense last stage and the RoI head
    get dense's gradients exactly; only the SBP layers' parameters differ."""
    cfg = small_faster_rcnn_cfg(True)
    cfg.backbone.update(norm_eval=True, sbp=dict(keep_ratio=0.5, exact_input_grad=True))
    cfg.neck.sbp = dict(convs=('lateral', 'output'), exact_input_grad=True)
    cfg.rpn_head.update(type='RPNHeadSBP', sbp=dict(exact_input_grad=True))
    sbp_model = build_detector(cfg)
    dense_cfg = small_faster_rcnn_cfg(False)
    dense_cfg.backbone.norm_eval = True
    dense = build_detector(dense_cfg)
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, shapes)
    images = {}
    for name, model in (('sbp', sbp_model), ('dense', dense)):
        images[name] = data['inputs'].clone().requires_grad_()
        loss = total_loss(model, dict(data, inputs=images[name]))
        loss.backward()
        images[name + '_loss'] = loss
    assert torch.equal(images['sbp_loss'], images['dense_loss'])
    assert_grad_close(images['sbp'].grad, images['dense'].grad, 'image')
    differ = []
    for (name, p), (_, q) in zip(sbp_model.named_parameters(), dense.named_parameters()):
        if name.startswith(('backbone.layer4', 'roi_head')):
            assert_grad_close(p.grad, q.grad, name)
        elif p.grad is not None and not torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6):
            differ.append(name)
    assert any(n.startswith('backbone.layer2') for n in differ)
    assert any(n.startswith('neck.fpn_convs') for n in differ)
    assert any(n.startswith('rpn_head') for n in differ)


@pytest.mark.parametrize('sbp,error', [
    (dict(convs=('lateral',), exact_input_grad=('output',)),
     r"ValueError: FPNSBP: sbp.exact_input_grad takes one value for the module; per group "
     r"write sbp=dict\(overrides=dict\(output=dict\(exact_input_grad=True\)\)\)"),
    (dict(exact_input_grad='output'), r"TypeError: sbp.exact_input_grad must be True or False"),
    (dict(overrides=dict(output=dict(exact_input_grad=True))),
     r"ValueError: FPNSBP: sbp.overrides sets \['output'\], which run densely"),
    (dict(overrides=dict(top_down=dict(recompute=True))),
     r"KeyError: .*FPNSBP: unknown group\(s\) \['top_down'\] in sbp.overrides; its groups are "
     r"\['lateral', 'output'\]"),
    (dict(overrides=dict(lateral=dict(keep_ratio=0.5))),
     r"KeyError: .*FPNSBP: sbp.overrides.lateral takes the layer keys"),
    (dict(overrides=[('lateral', {})]), r"TypeError: FPNSBP: sbp.overrides must be a dict"),
])
def test_bad_layer_settings_are_refused_showing_the_overrides_form(sbp, error):
    with pytest.raises((KeyError, TypeError, ValueError)) as err:
        FPNSBP(in_channels=[64, 128], out_channels=32, num_outs=2, sbp=sbp)
    assert re.search(error, f'{err.type.__name__}: {err.value}'), str(err.value)


@pytest.mark.parametrize('key,value', [('keep_ratio', 0.25), ('sampling', 'random'),
                                       ('per_image', True), ('grid_cell', 4)])
@pytest.mark.parametrize('module', ['FPNSBP', 'RPNHeadSBP'])
def test_a_mask_key_on_a_module_that_follows_the_mask_is_refused_naming_its_home(
        module, key, value):
    """The mask keys have one home, the backbone: a neck or head refuses them
    (before, a neck's grid_cell was silently unused)."""
    args = dict(in_channels=[64, 128], out_channels=32, num_outs=2) if module == 'FPNSBP' \
        else dict(in_channels=32, feat_channels=32)
    with pytest.raises(ValueError, match=rf'{module}: sbp.{key} is a mask setting, and this '
                                         r'module follows the mask that the backbone.* draws: '
                                         rf'set it there \(e.g. model.backbone.sbp.{key}\)'):
        MODELS.build(dict(type=module, sbp={key: value}, **args))


def test_a_group_override_reaches_only_its_layers():
    neck = FPNSBP(in_channels=[64, 128], out_channels=32, num_outs=2,
                  sbp=dict(recompute=True, convs=('lateral', 'output'),
                           overrides=dict(output=dict(recompute=False, grad_scale='inverse_keep'))))
    assert [(m.sbp_cfg.recompute, m.sbp_cfg.grad_scale) for m in neck.lateral_convs] == \
        [(True, 'none')] * 2
    assert [(m.sbp_cfg.recompute, m.sbp_cfg.grad_scale) for m in neck.fpn_convs] == \
        [(False, 'inverse_keep')] * 2


def test_exact_input_grad_on_a_train_mode_norm_is_refused_at_the_first_training_forward():
    """BatchNorm's mode is set by ``.train()`` (and a backbone's ``norm_eval``) after the
    module is built: it is checked at the first training forward after each ``.train()``."""
    neck = FPNSBP(in_channels=[64, 128], out_channels=32, num_outs=2, norm_cfg=dict(type='BN'),
                  sbp=dict(convs=('lateral', 'output'),
                           overrides=dict(output=dict(exact_input_grad=True))))
    backbone = ResNetSBP(18, out_indices=(0, 1), sbp=dict(keep_ratio=0.5)).train()
    feats = backbone(torch.rand(2, 3, 64, 64))
    with pytest.raises(TypeError, match=r'FPNSBP\.fpn_convs\.0: exact input gradients need '
                                        r'BatchNorm in eval mode'):
        neck.train()(feats)
    neck.fpn_convs.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)
    neck(feats)  # the next training forward after no .train(): checked once, not again
    neck.train()
    with pytest.raises(TypeError, match='exact input gradients need BatchNorm in eval mode'):
        neck(feats)


@pytest.mark.parametrize('convs', [(), 'lateral', ('lateral', 'top_down')])
def test_bad_neck_convs_are_refused_naming_the_choices(convs):
    with pytest.raises(ValueError, match=r"FPNSBP: sbp.convs must be a non-empty sequence of "
                                         r"\('lateral', 'output'\)"):
        FPNSBP(in_channels=[64, 128], out_channels=32, num_outs=2, sbp=dict(convs=convs))


def test_faster_rcnn_config_saves_much_less_for_backward():
    """configs/faster_rcnn_r50_sbp.py: backbone stages 2-3 and P2-P4 at keep 0.5
    store about half of their activations (the 3x3 halo and the dense stage 4
    and P5 keep the ratio above 0.5); keep 0.25 and recompute store less."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from sbp_mmdet.benchmark import detector_batch, variant_model
    from sbp_mmdet.variants import parse_variant
    register_all_modules()
    cfg = Config.fromfile('configs/faster_rcnn_r50_sbp.py')
    saved = {}
    for name in ('dense', 'sbp@0.5', 'sbp@0.25', 'sbp@0.5+recompute'):
        torch.manual_seed(0)
        model = MODELS.build(variant_model(cfg.model, parse_variant(name)))
        model.train()
        data = detector_batch(model, 2, 256, 384, num_classes=80)
        meter = SavedTensorMeter(model, {'backbone': model.backbone, 'neck': model.neck})
        with meter.measure():
            total_loss(model, data)
        saved[name] = meter.by_component['backbone'] + meter.by_component['neck']
    assert saved['sbp@0.5'] < 0.6 * saved['dense']
    assert saved['sbp@0.25'] < saved['sbp@0.5']
    assert saved['sbp@0.5+recompute'] < 0.8 * saved['sbp@0.5']


def test_neck_follows_the_backbone_mask_and_publishes_its_strides():
    from sbp_mmdet.benchmark import detector_batch
    model = build_detector(small_faster_rcnn_cfg(True))
    data = detector_batch(model, 2, 96, 128, num_classes=3)
    feats = model.backbone(data['inputs'])
    assert isinstance(feats, SBPFeatures) and feats.strides == STRIDES
    assert feats.iteration is model.backbone.sbp_iteration
    outs = model.neck(feats)
    assert isinstance(outs, SBPFeatures) and outs.strides == (4, 8, 16, 32, 64)
    assert outs.iteration is feats.iteration is model.neck.sbp_iteration
    assert model.neck.mask_sampler is None  # the keep ratio has one home: the backbone's
    with pytest.raises(AttributeError, match='FPNSBP follows the mask of the module before it'):
        model.neck.keep_ratio = 0.25


def test_neck_without_a_mask_to_follow_says_so_instead_of_drawing_one():
    """Anything between backbone and neck that rebuilds the feature tuple drops
    the mask: the neck refuses, unless told to draw its own."""
    model = build_detector(small_faster_rcnn_cfg(True))
    feats = model.backbone(torch.rand(2, 3, 64, 96))
    with pytest.raises(ValueError, match='FPNSBP: its inputs carry no SBP mask .*tuple'):
        model.neck(tuple(feats))
    with torch.no_grad():  # no training forward: nothing to follow, nothing asked
        model.neck(tuple(feats))
    own = FPNSBP(in_channels=[64, 128, 256, 512], out_channels=32, num_outs=5,
                 sbp=dict(own_mask=True, keep_ratio=0.5))
    own.train()
    outs = own(tuple(f.detach() for f in feats))
    assert outs.iteration is not feats.iteration and outs.iteration.keep_ratio == 0.5
    assert outs.strides == (1, 2, 4, 8, 16)


@pytest.mark.parametrize('backbone_sbp,neck_sbp,error', [
    ({}, dict(keep_ratio=0.25), 'FPNSBP: sbp.keep_ratio is a mask setting'),
    ({}, dict(grid_cell=4), 'FPNSBP: sbp.grid_cell is a mask setting'),
    ({}, dict(grad_scale='inverse_keep', recompute=True), None),
    ({}, dict(own_mask=True, keep_ratio=0.5),
     'FPNSBP: sbp.own_mask=True behind an SBP backbone, whose mask the neck follows'),
    ({}, dict(convs=('lateral',), top_down=True), "FPNSBP: unknown key(s) ['top_down']"),
    (dict(keep_ratio=2.0), {}, 'sbp.keep_ratio must be in (0, 1]'),
    (dict(overrides=dict(layer9=dict(recompute=True))), {},
     "ResNetSBP: unknown group(s) ['layer9']"),
])
def test_bad_or_misplaced_settings_are_reported_from_the_config(backbone_sbp, neck_sbp, error):
    from sbp_mmdet.models import sbp_model_problem
    model = dict(backbone=dict(type='ResNetSBP', depth=18, sbp=backbone_sbp),
                 neck=dict(type='FPNSBP', in_channels=[64, 128, 256, 512], out_channels=32,
                           num_outs=5, sbp=neck_sbp))
    problem = sbp_model_problem(model)
    assert problem == error if error is None else error in problem
