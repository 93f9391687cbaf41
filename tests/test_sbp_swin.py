"""SwinTransformerSBP: drop-in for mmdet's SwinTransformer, exact forward, reference gradients."""
import math
import pickle
from pathlib import Path

import mmdet
import pytest
import torch
from mmdet.models.backbones import SwinTransformer
from mmengine.config import Config
from torch import Tensor

import sbp_mmdet  # noqa: F401
from sbp_mmdet.benchmark import variant_model
from sbp_mmdet.models import FPNSBP, SwinTransformerSBP
from sbp_mmdet.sbp import SavedTensorMeter, SBPFeatures
from sbp_mmdet.variants import parse_variant

from sbp_builders import REPO
from sbp_reference import (assert_dense_without_training, assert_grads_match, masked, row_mask,
                           total_loss)

TINY = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
            drop_path_rate=0.3)


def swin_pair(sbp=None, **kwargs):
    """A tiny SwinTransformerSBP and mmdet's SwinTransformer with its weights,
    norms made informative, both in training mode."""
    kwargs = dict(TINY, **kwargs)
    torch.manual_seed(0)
    model = SwinTransformerSBP(sbp=dict(dict(keep_ratio=0.5, sampling='random'), **(sbp or {})),
                               **kwargs)
    for name, p in model.named_parameters():
        if 'norm' in name:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    dense = SwinTransformer(**kwargs)
    dense.load_state_dict(model.state_dict())
    model.train()  # mmdet's SwinTransformer.train returns None
    dense.train()
    return model, dense


def grid_shapes(model, image_size):
    """The ``(H, W)`` token grid of each stage (the patch embedding and the
    patch merging pad to multiples: sizes round up)."""
    shapes = []
    for stride in model.stage_strides:
        shapes.append((math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)))
    return shapes


def token_hook(iteration, stride, hw_shape, channels_first=False):
    """A forward hook that masks ``(B, H * W, C)`` tokens (or, with
    ``channels_first``, ``(B, C, H * W)`` patches) like an SBP unit output."""
    def mask(t: Tensor) -> Tensor:
        keep = row_mask(iteration, stride, t.new_empty(1, 1, hw_shape[0], 1))
        keep = keep.view(-1, 1, hw_shape[0], 1) if channels_first else \
            keep.view(-1, hw_shape[0], 1, 1)
        shape = (t.shape[0], -1, *hw_shape) if channels_first else (t.shape[0], *hw_shape, -1)
        return masked(t.view(shape), keep).view(t.shape)

    def hook(module, args, output):
        if isinstance(output, tuple):  # PatchMerging: (tokens, out shape)
            return mask(output[0]), output[1]
        return mask(output)
    return hook


def reference_hooks(model, dense, iteration, image_size):
    """Mask ``dense`` like ``model``'s SBP units: per block, the outputs of
    ``norm2``, ``fc1``, GELU, ``fc2``, DropPath and the FFN (with its residual);
    per patch merging, the unfold, the norm and the reduction."""
    shapes = grid_shapes(model, image_size)
    sbp_layers = dict(model.sbp_layer_inputs)
    handles = []
    for i, stage in enumerate(model.stages):
        hook = token_hook(iteration, model.stage_strides[i], shapes[i])
        for block, ref in zip(stage.blocks, dense.stages[i].blocks):
            if block in sbp_layers:
                (fc1, act, _), fc2, _ = ref.ffn.layers
                for module in (ref.norm2, fc1, act, fc2, ref.ffn.dropout_layer, ref.ffn):
                    handles.append(module.register_forward_hook(hook))
        if stage.downsample is not None and stage.downsample in sbp_layers:
            ref = dense.stages[i].downsample
            out_hook = token_hook(iteration, model.stage_strides[i + 1], shapes[i + 1])
            handles.append(ref.sampler.register_forward_hook(token_hook(
                iteration, model.stage_strides[i + 1], shapes[i + 1], channels_first=True)))
            for module in (m for m in (ref.norm, ref.reduction, ref) if m is not None):
                handles.append(module.register_forward_hook(out_hook))
    return handles


def assert_swin_matches_reference(model, dense, x, seed=0):
    """``model(x)`` equals ``dense(x)`` bit for bit (same DropPath draws); its
    gradients equal those of ``dense`` masked like SBP's units."""
    torch.manual_seed(seed)
    outs = model(x)
    assert isinstance(outs, SBPFeatures)
    handles = reference_hooks(model, dense, model.sbp_iteration, x.shape[2:])
    torch.manual_seed(seed)
    ref_outs = dense(x)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref_outs))
    grads = [torch.randn_like(o) for o in outs]
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    sum((o * g).sum() for o, g in zip(ref_outs, grads)).backward()  # with_cp re-runs the hooks
    for handle in handles:
        handle.remove()
    assert_grads_match(model, dense)


# sizes: a multiple of the window at every stage, odd sizes that pad windows and merging
@pytest.mark.parametrize('size', [(112, 112), (93, 77), (61, 130)])
@pytest.mark.parametrize('sbp', [dict(), dict(per_image=True), dict(downsample=False),
                                 dict(attention=False)],
                         ids=['shared', 'per_image', 'no_downsample', 'dense_attention'])
def test_forward_is_swin_and_gradients_equal_the_reference(size, sbp):
    model, dense = swin_pair(sbp)
    assert_swin_matches_reference(model, dense, torch.rand(2, 3, *size))
    kept = model.sbp_iteration.kept_fraction(4, math.ceil(size[0] / 4))
    assert 0 < kept < 1
    fc1 = model.stages[0].blocks[1].ffn.layers[0][0]  # a block with shifted windows
    assert model.stages[0].blocks[1].attn.shift_size > 0 and fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('kwargs', [
    # SBP blocks checkpointed whole (the MLP recomputed on kept rows), the last stage by mmdet
    dict(with_cp=True, sbp=dict(recompute=True)),
    dict(frozen_stages=1, sbp=dict(stages=[False, True, True, False])),
    dict(drop_path_rate=0.0, patch_norm=False),
    dict(with_cp=True, sbp=dict(attention=False, recompute=True)),
    dict(sbp=dict(recompute=True)),
    dict(with_cp=True),  # SBP blocks store their kept rows, the dense ones are checkpointed
    dict(sbp=dict(blocks=[[True, False], [False, True], [True, True], [False, False]])),
    dict(qkv_bias=False, window_size=4),
], ids=['with_cp', 'frozen', 'no_droppath_no_patch_norm', 'with_cp_dense_attention',
        'recompute', 'with_cp_alone', 'blocks', 'no_qkv_bias_window_4'])
def test_variants_equal_the_reference(kwargs):
    model, dense = swin_pair(**kwargs)
    assert_swin_matches_reference(model, dense, torch.rand(2, 3, 93, 77))


def test_overrides_set_the_layer_keys_per_stage():
    """``overrides`` per stage (``stage0``, ...); the patch merging in front of
    a stage (mmdet's ``stages[i - 1].downsample``) takes that stage's."""
    model, dense = swin_pair(dict(overrides=dict(stage1=dict(recompute=True))))
    recompute = {layer.sbp_where[len('SwinTransformerSBP.'):]: layer.sbp_cfg.recompute
                 for layer in model.sbp_adopted}
    assert recompute == {'stages.0.blocks.0': False, 'stages.0.blocks.1': False,
                         'stages.0.downsample': True, 'stages.1.blocks.0': True,
                         'stages.1.blocks.1': True, 'stages.1.downsample': False,
                         'stages.2.blocks.0': False, 'stages.2.blocks.1': False}
    assert_swin_matches_reference(model, dense, torch.rand(2, 3, 93, 77))


def test_default_follows_the_paper_and_skips_frozen_stages():
    model, _ = swin_pair()
    assert model.sbp_blocks == [[True, True]] * 3 + [[False, False]]
    assert model.stage_strides == [4, 8, 16, 32] and model.sbp_base_stride == 16
    merging = [layer for layer, _ in model.sbp_layer_inputs if layer in
               [stage.downsample for stage in model.stages]]
    assert merging == [model.stages[0].downsample, model.stages[1].downsample]
    model, _ = swin_pair(frozen_stages=2)
    assert model.sbp_blocks == [[False, False]] * 2 + [[True, True], [False, False]]
    # the merging in front of stage 2 ends frozen stage 1: dense
    assert model.stages[1].downsample not in dict(model.sbp_layer_inputs)


def test_eval_no_grad_and_keep_one_are_plain_swin():
    x = torch.rand(2, 3, 93, 77)
    model, dense = swin_pair(dict(keep_ratio=1.0))
    torch.manual_seed(0)
    outs = model(x)
    torch.manual_seed(0)
    assert all(torch.equal(o, r) for o, r in zip(outs, dense(x)))
    model, dense = swin_pair()
    assert_dense_without_training(model, dense, x)


def test_state_dicts_load_both_ways():
    model, dense = swin_pair()
    assert list(model.state_dict()) == list(dense.state_dict())
    torch.manual_seed(1)
    other = SwinTransformer(**TINY)
    model.load_state_dict(other.state_dict())
    back = SwinTransformer(**TINY)
    back.load_state_dict(model.state_dict())
    for state in (model.state_dict(), back.state_dict()):
        assert all(torch.equal(a, b) for a, b in zip(state.values(),
                                                     other.state_dict().values()))


def test_models_pickle_and_still_train_with_sbp():
    model, dense = swin_pair()
    restored = pickle.loads(pickle.dumps(model))
    restored.train()
    assert_swin_matches_reference(restored, dense, torch.rand(2, 3, 64, 64))


def test_bf16_autocast_stays_close_to_dense():
    """Under bf16 autocast the SBP forward is mmdet's (same ops, same dtypes)
    and the gradients stay close to the fp32 reference's."""
    model, dense = swin_pair()
    x = torch.rand(2, 3, 93, 77)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        torch.manual_seed(0)
        outs = model(x)
        torch.manual_seed(0)
        ref = dense(x)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref))
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().sum() for o in outs).backward()
    fp32, fp32_dense = swin_pair()
    torch.manual_seed(0)
    sum(o.sum() for o in fp32(x)).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), fp32.named_parameters()):
        if q.grad is not None and q.grad.abs().sum() > 0:
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), 0)
            assert cos > 0.98, name


def saved_bytes(model, x):
    meter = SavedTensorMeter(model, {'backbone': model})
    torch.manual_seed(0)
    with meter.measure():
        sum(o.sum() for o in model(x))
    return meter.by_component['backbone']


def test_each_sbp_part_saves_memory():
    """The MLP branches, then the patch merging, then the attention branches
    each lower the bytes saved for backward."""
    x = torch.rand(2, 3, 224, 224)
    saved = [saved_bytes(swin_pair(sbp)[0], x) for sbp in (
        dict(keep_ratio=1.0), dict(downsample=False, attention=False), dict(attention=False),
        dict())]
    assert saved[1] < 0.9 * saved[0]
    assert saved[3] < saved[2] < saved[1]


def test_with_cp_and_recompute_store_no_more_than_mmdets_checkpointing():
    """SBP blocks with ``sbp.recompute`` store their input alone, as mmdet's
    checkpointing does; SBP's patch merging stores less than the dense one.
    ``with_cp`` alone checkpoints the dense blocks only, and warns."""
    x = torch.rand(2, 3, 224, 224)
    sbp = saved_bytes(swin_pair()[0], x)
    both = saved_bytes(swin_pair(dict(recompute=True), with_cp=True)[0], x)
    checkpointing = saved_bytes(swin_pair(dict(keep_ratio=1.0), with_cp=True)[0], x)
    assert both < checkpointing and both < sbp
    with pytest.warns(UserWarning, match=r'SwinTransformerSBP: with_cp=True checkpoints the '
                                         r'blocks that run densely; the SBP blocks '
                                         r'\(SwinTransformerSBP\.stages\.0\.'):
        model = swin_pair(with_cp=True)[0]
    assert both < saved_bytes(model, x) < sbp  # the last stage checkpointed, the SBP ones not


def test_dropout_in_sbp_blocks_is_refused_naming_the_block():
    with pytest.raises(TypeError, match=r'SwinTransformerSBP\.stages\.0\.blocks\.0\.ffn: SBP '
                                        r'does not support element-wise dropout'):
        SwinTransformerSBP(**dict(TINY, drop_rate=0.1))
    SwinTransformerSBP(**dict(TINY, drop_rate=0.1), sbp=dict(stages=[False] * 4))
    SwinTransformerSBP(**dict(TINY, attn_drop_rate=0.1), sbp=dict(attention=False))


@pytest.mark.parametrize('kwargs, error', [
    (dict(sbp=dict(stages=[True, True])), 'sbp.stages must have 4 entries'),
    (dict(sbp=dict(stages=[True, True, True, False]), frozen_stages=1),
     r'frozen stage\(s\) \[0\]'),
    (dict(sbp=dict(downsample='yes')), 'sbp.downsample must be True or False'),
    (dict(sbp=dict(attention=1)), 'sbp.attention must be True or False'),
    (dict(attn_drop_rate=0.1), r'stages\.0\.blocks\.0\.attn: SBP does not support element-wise'),
    (dict(sbp=dict(exact_input_grad=True)), r'SwinTransformerSBP\.stages\.0\.blocks\.0: exact '
                                            'input gradients need convolutions'),
])
def test_bad_configs_are_refused_clearly(kwargs, error):
    with pytest.raises((KeyError, TypeError, ValueError), match=error):
        SwinTransformerSBP(**dict(TINY, **kwargs))


# ---------------------------------------------------------------- the configs

MMDET_CONFIGS = Path(mmdet.__file__).parent / '.mim' / 'configs'
CONFIGS = {'mask_rcnn': ('mask_rcnn_swin-t_sbp.py', 'mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'),
           'retinanet': ('retinanet_swin-t_sbp.py', 'retinanet_swin-t-p4-w7_fpn_1x_coco.py')}


@pytest.mark.parametrize('name', CONFIGS)
def test_configs_swap_only_the_sbp_keys_of_mmdets_swin_configs(name):
    ours, base = CONFIGS[name]
    cfg = Config.fromfile(str(REPO / 'configs' / ours))
    mmdet = Config.fromfile(str(MMDET_CONFIGS / 'swin' / base))
    assert cfg.model.backbone.type == 'SwinTransformerSBP' and cfg.model.neck.type == 'FPNSBP'
    for part in ('backbone', 'neck'):
        ours_part = {k: v for k, v in cfg.model[part].items() if k not in ('type', 'sbp')}
        assert ours_part == {k: v for k, v in mmdet.model[part].items() if k != 'type'}
    assert cfg.custom_hooks == [dict(type='SBPHook')]
    for key in ('roi_head', 'rpn_head', 'bbox_head', 'train_cfg', 'test_cfg'):
        assert cfg.model.get(key) == mmdet.model.get(key)
    assert {k: v for k, v in cfg.optim_wrapper.items() if k != '_scope_'} == mmdet.optim_wrapper


def tiny_detector_cfg(name: str, sbp: bool) -> dict:
    """The config's detector on a tiny Swin; without SBP, mmdet's types."""
    cfg = Config.fromfile(str(REPO / 'configs' / CONFIGS[name][0])).model
    cfg = variant_model(cfg, parse_variant('sbp@0.5' if sbp else 'dense'))
    cfg.backbone.update(TINY)
    channels = [32 * 2**i for i in range(4)]
    cfg.neck.update(in_channels=[channels[i] for i in cfg.backbone.out_indices], out_channels=16)
    if name == 'mask_rcnn':
        cfg.rpn_head.update(in_channels=16, feat_channels=16)
        cfg.roi_head.bbox_roi_extractor.update(out_channels=16)
        cfg.roi_head.bbox_head.update(in_channels=16, fc_out_channels=32, num_classes=3)
        cfg.roi_head.mask_roi_extractor.update(out_channels=16)
        cfg.roi_head.mask_head.update(in_channels=16, conv_out_channels=16, num_classes=3)
    else:
        cfg.bbox_head.update(in_channels=16, feat_channels=16, num_classes=3)
    return cfg


@pytest.mark.parametrize('name', CONFIGS)
def test_config_detectors_train_and_their_first_loss_equals_dense(name):
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules()
    models = []
    for sbp in (True, False):
        torch.manual_seed(0)
        models.append(MODELS.build(tiny_detector_cfg(name, sbp)))
        models[-1].train()
    model, dense = models
    dense.load_state_dict(model.state_dict())
    assert isinstance(model.backbone, SwinTransformerSBP) and isinstance(model.neck, FPNSBP)
    torch.manual_seed(0)
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 96, 128)] * 2, num_items=[4, 4],
                            num_classes=3, with_mask=name == 'mask_rcnn')
    data = model.data_preprocessor(packed, True)
    loss = total_loss(model, data)
    torch.testing.assert_close(loss, total_loss(dense, data))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert model.backbone.sbp_iteration.keep_ratio == 0.5
    assert torch.isfinite(total_loss(model, data))
