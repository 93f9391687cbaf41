"""ConvNeXtSBP: drop-in for mmpretrain's ConvNeXt, exact forward, reference gradients."""
import math
import pickle

import pytest
import torch
from mmengine.config import Config

import sbp_mmdet  # noqa: F401
from sbp_mmdet.benchmark import variant_model
from sbp_mmdet.models import FPNSBP, ConvNeXtSBP
from sbp_mmdet.models.backbones.mmpretrain_convnext import ConvNeXt
from sbp_mmdet.sbp import SavedTensorMeter, SBPFeatures
from sbp_mmdet.variants import parse_variant

from sbp_builders import REPO, TINY_DATA_CFG
from sbp_reference import (assert_dense_without_training, assert_grads_match, backward_both,
                           masking_hooks)

CONFIG = str(REPO / 'configs' / 'mask_rcnn_convnext_t_sbp.py')
TINY_ARCH = {'depths': [1, 1, 2, 1], 'channels': [8, 16, 24, 32]}


def convnext_kwargs(**kwargs):
    """mmdet's ConvNeXt-T detector settings on a tiny arch."""
    return dict(dict(arch=dict(TINY_ARCH), out_indices=[0, 1, 2, 3], drop_path_rate=0.4,
                     layer_scale_init_value=1.0, gap_before_final_norm=False), **kwargs)


def convnext_pair(sbp=None, **kwargs):
    torch.manual_seed(0)
    model = ConvNeXtSBP(sbp=dict(sbp or {}, sampling='random'), **convnext_kwargs(**kwargs))
    for name, p in model.named_parameters():  # informative norms and layer scales
        if not name.endswith('weight') or p.dim() == 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    dense = ConvNeXt(**convnext_kwargs(**kwargs))
    dense.load_state_dict(model.state_dict())
    model.train()  # mmpretrain's ConvNeXt.train returns None
    dense.train()
    return model, dense


def convnext_stride_of(model, image_height):
    """The stride of a map from its height (ConvNeXt's unpadded convs floor)."""
    strides, height = {image_height: 1}, image_height // model.stage_strides[0]
    for stride in model.stage_strides:
        assert height not in strides, 'pick an image height whose maps differ in height'
        strides[height] = stride
        height //= 2
    return lambda output: strides[output.shape[2]]


def convnext_reference_units(dense, model):
    """The modules of ``dense`` whose outputs SBP's units mask in ``model``: each
    block's depthwise conv and output, the stem/downsampling layers' convs and
    norms, the output norms."""
    units = []
    for i, stage in enumerate(model.stages):
        units += [dense.stages[i][j].depthwise_conv for j, block in enumerate(stage)
                  if block in dict(model.sbp_layer_inputs)]
        units += [dense.stages[i][j] for j, block in enumerate(stage)
                  if block in dict(model.sbp_layer_inputs)]
        if model.downsample_layers[i] in dict(model.sbp_layer_inputs):
            units += list(dense.downsample_layers[i])
        if i in model.out_indices and getattr(model, f'norm{i}') in dict(model.sbp_layer_inputs):
            units.append(getattr(dense, f'norm{i}'))
    return units


def assert_convnext_matches_reference(model, dense, x, seed=0):
    """``model(x)`` equals ``dense(x)`` bit for bit (same DropPath draws); its
    gradients equal those of ``dense`` masked like SBP's units."""
    torch.manual_seed(seed)
    outs = model(x)
    assert isinstance(outs, SBPFeatures)
    hook = masking_hooks(model.sbp_iteration, convnext_stride_of(model, x.shape[2]))
    for unit in convnext_reference_units(dense, model):
        unit.register_forward_hook(hook)
    torch.manual_seed(seed)
    ref_outs = dense(x)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref_outs))
    backward_both(outs, ref_outs)
    assert_grads_match(model, dense)


@pytest.mark.parametrize('size', [(64, 96), (67, 61), (45, 130), (32, 40)])
@pytest.mark.parametrize('downsample', [True, False])
def test_forward_is_convnext_and_gradients_equal_the_reference(size, downsample):
    model, dense = convnext_pair(dict(keep_ratio=0.5, downsample=downsample))
    assert_convnext_matches_reference(model, dense, torch.rand(2, 3, *size))
    assert model.stages[0][0].depthwise_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('size', [(67, 61), (45, 130)])
@pytest.mark.parametrize('recompute,kwargs', [(False, dict()), (True, dict(with_cp=True)),
                                              (False, dict(linear_pw_conv=False))],
                         ids=['store', 'recompute', 'conv_pw'])
def test_per_image_masks_are_convnext_with_the_reference_gradients(size, recompute, kwargs):
    model, dense = convnext_pair(dict(keep_ratio=0.5, per_image=True, recompute=recompute),
                                 **kwargs)
    assert_convnext_matches_reference(model, dense, torch.rand(2, 3, *size))
    mask = model.sbp_iteration.base_mask
    assert mask.dim() == 2 and not torch.equal(mask[0], mask[1])
    assert model.stages[0][0].depthwise_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('kwargs', [
    dict(linear_pw_conv=False),  # 1x1 convs and a channel-first norm
    dict(layer_scale_init_value=0.0, drop_path_rate=0.0),  # no gamma, no DropPath
    dict(with_cp=True),  # with sbp.recompute: recomputes on the kept rows
    dict(frozen_stages=1),
    dict(stem_patch_size=2),
])
def test_block_variants_equal_the_reference(kwargs):
    model, dense = convnext_pair(dict(keep_ratio=0.5, recompute=kwargs.get('with_cp', False)),
                                 **kwargs)
    assert_convnext_matches_reference(model, dense, torch.rand(2, 3, 67, 61))


def test_blocks_switch_per_block_and_the_base_stride_follows():
    blocks = [[True], [False], [True, False], [False]]
    model, dense = convnext_pair(dict(keep_ratio=0.5, blocks=blocks))
    assert model.sbp_base_stride == 16
    assert_convnext_matches_reference(model, dense, torch.rand(2, 3, 64, 64))


def test_default_follows_the_paper_and_skips_frozen_stages():
    model, _ = convnext_pair(dict(keep_ratio=0.5))
    assert model.sbp_blocks == [[True], [True], [True, True], [False]]
    assert model.sbp_base_stride == 16
    model, _ = convnext_pair(dict(keep_ratio=0.5), frozen_stages=2)
    assert model.sbp_blocks == [[False], [False], [True, True], [False]]


def test_eval_no_grad_and_keep_one_are_plain_convnext():
    model, dense = convnext_pair(dict(keep_ratio=1.0))
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(0)
    outs = model(x)
    torch.manual_seed(0)
    assert all(torch.equal(o, r) for o, r in zip(outs, dense(x)))
    assert outs.iteration.keep_ratio == 1.0
    model, dense = convnext_pair(dict(keep_ratio=0.5))
    assert_dense_without_training(model, dense, x)


def test_state_dicts_are_interchangeable():
    model, dense = convnext_pair(dict(keep_ratio=0.5))
    assert list(model.state_dict()) == list(dense.state_dict())
    torch.manual_seed(1)
    other = ConvNeXt(**convnext_kwargs())
    model.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 other.state_dict().values()))


def test_models_pickle_and_still_train_with_sbp():
    model, dense = convnext_pair(dict(keep_ratio=0.5))
    restored = pickle.loads(pickle.dumps(model))
    restored.train()
    assert_convnext_matches_reference(restored, dense, torch.rand(2, 3, 64, 64))


@pytest.mark.parametrize('kwargs, error', [
    (dict(use_grn=True, layer_scale_init_value=0.0),
     r'ConvNeXtSBP\.stages\.0\.0: SBP does not support GRN'),
    (dict(gap_before_final_norm=True), 'gap_before_final_norm=True'),
    (dict(sbp=dict(stages=[True, True])), 'sbp.stages must have 4 entries'),
    (dict(sbp=dict(stages=[True, True, True, False]), frozen_stages=1),
     r'frozen stage\(s\) \[0\]'),
    (dict(sbp=dict(keep_ratio=0.5, downsampling=True)), 'downsampling'),
    (dict(sbp=dict(downsample='yes')), 'sbp.downsample must be True or False'),
])
def test_bad_configs_are_refused_clearly(kwargs, error):
    with pytest.raises((KeyError, TypeError, ValueError), match=error):
        ConvNeXtSBP(**dict(convnext_kwargs(), **kwargs))


def test_exact_input_grad_is_refused_at_build_time_naming_the_layer():
    with pytest.raises(TypeError, match=r'ConvNeXtSBP\.stages\.0\.0: exact input '
                                        r'gradients need convolutions followed by eval-mode'):
        ConvNeXtSBP(**convnext_kwargs(sbp=dict(exact_input_grad=True)))


def test_grn_stages_may_stay_dense():
    model = ConvNeXtSBP(**convnext_kwargs(use_grn=True, layer_scale_init_value=0.0,
                                          sbp=dict(stages=[False] * 4)))
    assert model.sbp_layer_inputs == []


def test_downsample_layers_in_sbp_save_memory():
    """The stem and downsampling layers store their norm's and conv's inputs in
    full when dense; inside SBP only their kept rows."""
    saved = {}
    x = torch.rand(2, 3, 128, 128)
    for downsample in (False, True):
        model, _ = convnext_pair(dict(keep_ratio=0.5, downsample=downsample))
        meter = SavedTensorMeter(model, {'backbone': model})
        with meter.measure():
            sum(o.sum() for o in model(x))
        saved[downsample] = meter.by_component['backbone']
    assert saved[True] < 0.95 * saved[False]


def mask_rcnn_cfg(sbp: bool) -> dict:
    """configs/mask_rcnn_convnext_t_sbp.py (mmdet's Mask R-CNN ConvNeXt-T with the
    backbone and neck types swapped), narrowed; without SBP, mmdet's types."""
    cfg = Config.fromfile(CONFIG).model
    cfg = variant_model(cfg, parse_variant('sbp@0.5' if sbp else 'dense'))
    cfg.backbone.update(arch=dict(TINY_ARCH))
    cfg.neck.update(in_channels=TINY_ARCH['channels'], out_channels=16)
    cfg.rpn_head.update(in_channels=16, feat_channels=16)
    cfg.roi_head.bbox_roi_extractor.update(out_channels=16)
    cfg.roi_head.bbox_head.update(in_channels=16, fc_out_channels=32, num_classes=3)
    cfg.roi_head.mask_roi_extractor.update(out_channels=16)
    cfg.roi_head.mask_head.update(in_channels=16, conv_out_channels=16, num_classes=3)
    return cfg


def detector_loss(model, data, seed=1):
    torch.manual_seed(seed)  # DropPath and the RPN/RoI samplers draw from it
    losses = model(**data, mode='loss')
    return sum(v.sum() if torch.is_tensor(v) else sum(x.sum() for x in v)
               for k, v in losses.items() if 'loss' in k)


@pytest.mark.parametrize('per_image', [False, True], ids=['shared', 'per_image'])
def test_mask_rcnn_convnext_trains_and_its_first_loss_equals_dense(per_image):
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules()
    models = []
    for sbp in (True, False):
        cfg = mask_rcnn_cfg(sbp)
        if sbp:
            cfg.backbone.sbp.update(per_image=per_image)
        torch.manual_seed(0)
        models.append(MODELS.build(cfg))
        models[-1].init_weights()
        models[-1].train()
    model, dense = models
    dense.load_state_dict(model.state_dict())
    assert isinstance(model.backbone, ConvNeXtSBP) and isinstance(model.neck, FPNSBP)
    torch.manual_seed(0)
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 96, 128)] * 2, num_items=[4, 4],
                            num_classes=3, with_mask=True)
    data = model.data_preprocessor(packed, True)
    loss = detector_loss(model, data)
    torch.testing.assert_close(loss, detector_loss(dense, data))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss.backward()
    optimizer.step()
    assert model.backbone.sbp_iteration.keep_ratio == 0.5
    assert model.backbone.sbp_iteration.per_image == per_image
    assert torch.isfinite(detector_loss(model, data))


def test_config_builds_with_sbp_in_the_early_stages():
    from mmdet.registry import MODELS
    cfg = Config.fromfile(CONFIG)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    assert isinstance(model.backbone, ConvNeXtSBP) and isinstance(model.neck, FPNSBP)
    assert model.backbone.sbp_blocks == [[True] * 3, [True] * 3, [True] * 9, [False] * 3]


def test_a_mask_key_on_the_neck_behind_convnext_is_reported_from_the_config():
    from sbp_mmdet.models import sbp_model_problem
    cfg = Config.fromfile(CONFIG).model
    assert sbp_model_problem(cfg) is None
    cfg.neck.sbp = dict(keep_ratio=0.25)
    assert 'FPNSBP: sbp.keep_ratio is a mask setting' in sbp_model_problem(cfg)
    cfg.neck.sbp = {}
    cfg.backbone.sbp.downsampling = False
    assert 'ConvNeXtSBP: unknown key' in sbp_model_problem(cfg)


def test_config_trains_one_iteration_on_the_synthetic_set(workspace, tmp_path, monkeypatch):
    """configs/mask_rcnn_convnext_t_sbp.py (ConvNeXt-T, mmdet's layer-wise lr decay) on
    the tiny synthetic set, boxes only: the synthetic set has no instance masks."""
    from mmengine.runner import Runner
    monkeypatch.chdir(workspace)
    cfg = Config.fromfile(CONFIG)
    cfg.model.backbone.init_cfg = None
    cfg.model.roi_head.update(mask_roi_extractor=None, mask_head=None,
                              bbox_head=dict(num_classes=4))
    cfg.train_dataloader = TINY_DATA_CFG.train_dataloader
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1)
    cfg.optim_wrapper.type = 'OptimWrapper'  # mmdet's config trains with CUDA AMP
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    cfg.update(work_dir=str(tmp_path), val_cfg=None, val_dataloader=None, val_evaluator=None,
               test_cfg=None, test_dataloader=None, test_evaluator=None)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 1
    assert runner.model.backbone.sbp_iteration.keep_ratio == 0.75
    assert math.isfinite(runner.message_hub.get_scalar('train/loss').current())
