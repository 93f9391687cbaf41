"""RPNHeadSBP and RetinaHeadSBP: drop-in, exact forward, reference gradients, less memory."""
import math

import pytest
import torch
from mmdet.models.dense_heads import RetinaHead, RPNHead

from sbp_mmdet.models import RetinaHeadSBP, RPNHeadSBP
from sbp_mmdet.sbp import SavedTensorMeter, SBPFeatures, SBPIteration

from sbp_builders import build_detector, faster_rcnn_cfg, preprocessed_batch, small_retinanet_cfg
from sbp_reference import (add_reference_hooks, assert_grads_match, assert_matches_reference,
                           enabled_blocks, head_hooks, reference_units, total_loss,
                           weight_masking_hook)


def exact_input_grad_cfg(detector: str) -> dict:
    """SBP heads and FPN output convs on their weight gradients only."""
    cfg = faster_rcnn_cfg(True) if detector == 'faster_rcnn' else small_retinanet_cfg(True)
    cfg.neck.sbp = dict(convs=('lateral', 'output'),
                        overrides=dict(output=dict(exact_input_grad=True)))
    (cfg.rpn_head if detector == 'faster_rcnn' else cfg.bbox_head).sbp = dict(
        exact_input_grad=True)
    return cfg


def output_convs(head):
    """The head's classification and regression convs."""
    return [getattr(head, name) for name in ('rpn_cls', 'rpn_reg', 'retina_cls', 'retina_reg')
            if hasattr(head, name)]


@pytest.mark.parametrize('shapes', [
    [(96, 128)] * 2,
    [(37, 53), (61, 29)],  # padded to one size
    [(448, 32)] * 2,  # extreme aspect ratio
    [(20, 28)] * 2,  # 1-row coarse levels
])
@pytest.mark.parametrize('detector', ['faster_rcnn', 'retinanet'])
@pytest.mark.parametrize('head_sbp', [
    dict(recompute=False), dict(recompute='all'), dict(dense_outputs=True),
    dict(dense_outputs=True, recompute='all')],
    ids=['store', 'recompute_all', 'dense_outputs', 'dense_outputs_recompute_all'])
def test_detector_with_sbp_head_is_exact_with_reference_gradients(detector, shapes, head_sbp):
    """With ``dense_outputs`` the reference masks the towers only: the output
    convs' weights learn from every row."""
    check_sbp_head_against_reference(detector, shapes, head_sbp)


@pytest.mark.parametrize('shapes', [[(96, 128)] * 2, [(37, 53), (61, 29)]])
@pytest.mark.parametrize('head_sbp', [dict(recompute=False), dict(recompute='all')],
                         ids=['store', 'recompute_all'])
def test_retina_head_with_group_norm_is_exact_with_reference_gradients(shapes, head_sbp):
    """GroupNorm towers (FCOS/ATSS practice): per-image group statistics over the
    full map, their gradient term kept exactly at the kept rows."""
    check_sbp_head_against_reference('retinanet', shapes, head_sbp,
                                     norm_cfg=dict(type='GN', num_groups=4, requires_grad=True))


def check_sbp_head_against_reference(detector, shapes, head_sbp, norm_cfg=None):
    cfg_of = faster_rcnn_cfg if detector == 'faster_rcnn' else small_retinanet_cfg
    head_name = 'rpn_head' if detector == 'faster_rcnn' else 'bbox_head'
    cfg, dense_cfg = cfg_of(True), cfg_of(False)
    cfg[head_name].sbp = head_sbp
    if norm_cfg is not None:
        cfg[head_name].norm_cfg = dense_cfg[head_name].norm_cfg = norm_cfg
    sbp_model = build_detector(cfg)
    dense = build_detector(dense_cfg)
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, shapes)
    loss = total_loss(sbp_model, data)
    iteration = sbp_model.backbone.sbp_iteration
    assert getattr(sbp_model, head_name).sbp_iteration is iteration
    height = data['inputs'].shape[2]
    levels = [(0, 4), (1, 8), (2, 16), (3, 32)] if detector == 'faster_rcnn' else \
        [(0, 8), (1, 16), (2, 32)]
    add_reference_hooks(reference_units(dense, sbp_model, iteration, levels), iteration, height)
    dense_head = getattr(dense, head_name)
    head_hooks(dense_head, iteration, height,
               dense=output_convs(dense_head) if head_sbp.get('dense_outputs') else ())
    ref_loss = total_loss(dense, data)
    assert torch.equal(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    assert_grads_match(sbp_model, dense)


@pytest.mark.parametrize('shapes', [[(96, 128)] * 2, [(37, 53), (61, 29)], [(20, 28)] * 2])
@pytest.mark.parametrize('detector', ['faster_rcnn', 'retinanet'])
def test_heads_and_output_convs_with_exact_input_grad_equal_their_reference(detector, shapes):
    """Heads and FPN output convs with ``exact_input_grad``: their convs' weights
    learn on kept rows, everything before them gets every row's gradient."""
    sbp_model = build_detector(exact_input_grad_cfg(detector))
    dense = build_detector(faster_rcnn_cfg(False) if detector == 'faster_rcnn'
                           else small_retinanet_cfg(False))
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, shapes)
    loss = total_loss(sbp_model, data)
    iteration = sbp_model.backbone.sbp_iteration
    height = data['inputs'].shape[2]
    levels = [(0, 4), (1, 8), (2, 16), (3, 32)] if detector == 'faster_rcnn' else \
        [(0, 8), (1, 16), (2, 32)]
    add_reference_hooks(enabled_blocks(dense.backbone, sbp_model.backbone.sbp_blocks)
                        + [dense.neck.lateral_convs[i] for i, stride in levels
                           if iteration.covers(stride)], iteration, height)
    hook = weight_masking_hook(iteration, lambda out: next(
        s for s in (4, 8, 16, 32, 64, 128) if math.ceil(height / s) == out.shape[2]))
    head = dense.rpn_head if detector == 'faster_rcnn' else dense.bbox_head
    covered = [m for i, stride in levels if iteration.covers(stride)
               for m in [dense.neck.fpn_convs[i].conv]]
    for conv in covered:
        conv.register_forward_hook(hook)

    def head_hook(conv, args, output):  # the head's convs on the covered levels only
        stride = next(s for s in (4, 8, 16, 32, 64, 128) if math.ceil(height / s) ==
                      output.shape[2])
        return hook(conv, args, output) if iteration.covers(stride) else output
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(head_hook)
    assert_matches_reference(sbp_model, dense, data, loss, bitwise=True)


def test_exact_input_grad_of_a_head_is_checked_at_build_and_first_training_forward():
    """The value at build time; BatchNorm's mode at the first training forward after
    ``.train()`` (the mode is set after the head is built)."""
    with pytest.raises(TypeError, match="sbp.exact_input_grad must be True or False, got 'yes'"):
        RPNHeadSBP(in_channels=16, feat_channels=16, sbp=dict(exact_input_grad='yes'))
    head = RetinaHeadSBP(num_classes=3, in_channels=16, feat_channels=16, stacked_convs=1,
                         norm_cfg=dict(type='BN'), sbp=dict(exact_input_grad=True)).train()
    iteration = SBPIteration(torch.tensor([True, False, True, False]), base_stride=8)
    features = SBPFeatures([torch.rand(2, 16, 32, 32)], iteration, [8])
    with pytest.raises(TypeError, match='RetinaHeadSBP.cls_convs.0: exact input gradients need '
                                        'BatchNorm in eval mode'):
        head(features)


def test_dense_outputs_is_checked_at_build_time():
    with pytest.raises(TypeError, match="RPNHeadSBP: sbp.dense_outputs must be True or False, "
                                        "got 'yes'"):
        RPNHeadSBP(in_channels=16, feat_channels=16, sbp=dict(dense_outputs='yes'))


@pytest.mark.parametrize('sbp_cls,dense_cls,kwargs', [
    (RPNHeadSBP, RPNHead, dict(in_channels=16, feat_channels=16)),
    (RPNHeadSBP, RPNHead, dict(in_channels=16, feat_channels=16, num_convs=2)),
    (RetinaHeadSBP, RetinaHead, dict(num_classes=3, in_channels=16, feat_channels=16,
                                     stacked_convs=2)),
])
def test_heads_are_drop_in_and_refuse_inputs_without_a_mask(sbp_cls, dense_cls, kwargs):
    torch.manual_seed(0)
    head = sbp_cls(**kwargs)
    dense = dense_cls(**kwargs)
    head.load_state_dict(dense.state_dict(), strict=True)
    dense.load_state_dict(head.state_dict(), strict=True)
    feats = tuple(torch.rand(2, 16, 16 // 2**i, 12) for i in range(3))
    head.train()
    with pytest.raises(ValueError, match=f'{sbp_cls.__name__}: its inputs carry no SBP mask'):
        head(feats)
    head.eval()
    dense.eval()
    with torch.no_grad():
        for a, b in zip(head(feats), dense(feats)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def retina_head_saved_bytes(head_sbp) -> int:
    """Bytes the RetinaNet head saves for backward, with ``head_sbp`` as its
    ``sbp`` (None: the dense head), on one 256x320 batch."""
    cfg = small_retinanet_cfg(head_sbp is not None)
    cfg.bbox_head.stacked_convs = 4  # RetinaNet's towers
    if head_sbp is not None:
        cfg.backbone.sbp.sampling = 'grid'  # the configs' mask
        cfg.bbox_head.sbp = head_sbp
    model = build_detector(cfg)
    meter = SavedTensorMeter(model, {'bbox_head': model.bbox_head})
    with meter.measure():
        total_loss(model, preprocessed_batch(model, [(256, 320)] * 2))
    return meter.by_component['bbox_head']


def test_retina_head_recomputing_its_towers_stores_their_inputs_only():
    """At keep 0.5 with grid cells of 2 rows every tower layer's kept rows plus
    halo cover P4 and most of P3, so the storing head saves most of what the
    dense head saves (0.78x); with ``recompute='all'`` the covered levels keep
    only their input, 1 of the 9 maps a level stores densely (0.17x: P5-P7
    are dense)."""
    dense = retina_head_saved_bytes(None)
    stored = retina_head_saved_bytes(dict())
    recomputed = retina_head_saved_bytes(dict(recompute='all'))
    assert stored > 0.7 * dense
    assert recomputed < 0.25 * dense


def test_rpn_head_saves_much_less_for_backward():
    """The SBP RPN head stores its input at kept rows plus the 3x3 halo and its
    conv output at kept rows on the covered levels (P2-P4 here)."""
    saved = {}
    data = None
    for sbp in (False, True):
        model = build_detector(faster_rcnn_cfg(sbp))
        data = data or preprocessed_batch(model, [(256, 320)] * 2)
        meter = SavedTensorMeter(model, {'rpn_head': model.rpn_head})
        with meter.measure():
            total_loss(model, data)
        saved[sbp] = meter.by_component['rpn_head']
    assert saved[True] < 0.75 * saved[False]


@pytest.mark.parametrize('detector', ['faster_rcnn', 'retinanet'])
def test_detector_with_sbp_head_under_cpu_autocast(detector):
    """bf16 autocast: the loss equals the dense detector's under the same autocast
    (the heads' programs compute in bf16 like the dense convs) and gradients are
    finite fp32."""
    from sbp_mmdet.amp import cpu_autocast_fallbacks
    cfg_of = faster_rcnn_cfg if detector == 'faster_rcnn' else small_retinanet_cfg
    sbp_model = build_detector(cfg_of(True))
    dense = build_detector(cfg_of(False))
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, [(96, 128)] * 2)
    losses = {}
    for name, model in (('sbp', sbp_model), ('dense', dense)):
        with cpu_autocast_fallbacks(model), torch.autocast('cpu', dtype=torch.bfloat16):
            losses[name] = total_loss(model, data)
    assert torch.equal(losses['sbp'], losses['dense'])
    losses['sbp'].backward()
    head = sbp_model.rpn_head if detector == 'faster_rcnn' else sbp_model.bbox_head
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               and torch.isfinite(p.grad).all() for p in head.parameters())
