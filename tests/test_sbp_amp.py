"""SBP under mixed precision: half-precision compute and storage, reference gradients.

Tolerance. Under autocast the reference (plain autograd with where/detach masks)
and SBP compute the same quantities with bf16/fp16 roundings in different places
(SBP runs convolutions on packed bands, sums the weight gradient band by band and
recomputes BatchNorm and ReLU from stored rows). Neither is more exact than the
other, so the yardstick is autocast's own error: for every gradient ``g``,

    |g_sbp - g_ref| <= 2 * |g_ref - g_ref_fp32| + u * |g_ref|      (Frobenius norms)

where ``g_ref_fp32`` is the reference in fp32 and ``u`` is the unit roundoff of the
half-precision type (2**-8 for bf16, 2**-11 for fp16): SBP under autocast is as
close to the reference under autocast as autocast is to fp32, up to one rounding.
"""
import copy

import pytest
import torch
from mmdet.models.backbones import ResNet

from sbp_mmdet.amp import cpu_autocast_fallbacks
from sbp_mmdet.sbp import SavedTensorMeter

from sbp_builders import (basic, basic_program, bottleneck, bottleneck_program, build_detector,
                          fpn_output, fpn_program, preprocessed_batch, resnet_pair,
                          small_faster_rcnn_cfg)
from sbp_reference import (MASKS, add_reference_hooks, assert_amp_close, autocast, enabled_blocks,
                           iteration, reference_program, run_three_ways, total_loss)

PROGRAMS = {
    'bottleneck': (bottleneck, bottleneck_program, (2, 16, 29, 11), 4),
    'basic': (basic, basic_program, (2, 8, 16, 7), 8),
    'fpn_output': (fpn_output, fpn_program, (2, 8, 19, 9), 4),
}


@pytest.mark.parametrize('recompute', [False, True], ids=['store', 'recompute'])
@pytest.mark.parametrize('mask', ['grid', 'random', 'all'])
@pytest.mark.parametrize('program', list(PROGRAMS))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_units_compute_in_half_precision_with_reference_gradients(dtype, program, mask,
                                                                  recompute):
    build, program_of, x_shape, stride = PROGRAMS[program]
    modules, inputs, outs = run_three_ways(build, program_of, x_shape, stride, MASKS[mask],
                                           dtype, recompute)
    # forward: the dense modules' values under the same autocast, bit for bit (a
    # residual add of the fp32 input promotes the output to fp32, as in the dense block)
    assert outs['sbp'].dtype == outs['ref'].dtype
    assert torch.equal(outs['sbp'], outs['ref'])
    assert inputs['sbp'].grad.dtype == torch.float32
    assert_amp_close(inputs['sbp'].grad, inputs['ref'].grad, inputs['fp32'].grad, dtype, 'input')
    named = [dict(m.named_parameters()) for m in (modules['sbp'], modules['ref'], modules['fp32'])]
    for name, param in named[0].items():
        assert param.grad.dtype == param.dtype, name
        assert_amp_close(param.grad, named[1][name].grad, named[2][name].grad, dtype, name)


@pytest.mark.parametrize('mask', ['grid', 'random'])
@pytest.mark.parametrize('program', ['bottleneck', 'fpn_output'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_exact_input_grad_under_autocast_matches_its_reference(dtype, program, mask):
    build, program_of, x_shape, stride = PROGRAMS[program]
    eval_build = (lambda: build().eval()) if program == 'bottleneck' else build  # norm_eval
    modules, inputs, outs = run_three_ways(eval_build, program_of, x_shape, stride,
                                           MASKS[mask], dtype, exact_input_grad=True)
    assert torch.equal(outs['sbp'], outs['ref'])
    assert_amp_close(inputs['sbp'].grad, inputs['ref'].grad, inputs['fp32'].grad, dtype, 'input')
    named = [dict(m.named_parameters()) for m in (modules['sbp'], modules['ref'], modules['fp32'])]
    for name, param in named[0].items():
        assert param.grad.dtype == param.dtype, name
        assert_amp_close(param.grad, named[1][name].grad, named[2][name].grad, dtype, name)


def saved_dtypes_and_bytes(fn):
    """Dtypes and bytes of the activations autograd saves while ``fn`` runs."""
    dtypes = set()

    def pack(t):
        dtypes.add(t.dtype)
        return t
    meter = SavedTensorMeter(torch.nn.Module())
    with meter.measure(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return dtypes, meter.total_bytes


@pytest.mark.parametrize('recompute', [False, True], ids=['store', 'recompute'])
def test_units_store_their_rows_in_half_precision(recompute):
    """Under autocast a unit stores the same rows as in fp32, in half the bytes."""
    torch.manual_seed(0)
    modules = bottleneck(cin=64, mid=16)
    x = torch.randn(2, 64, 64, 32, requires_grad=True)
    it = iteration(MASKS['grid'])

    def run(dtype):
        def fn():
            with autocast(dtype):
                bottleneck_program(modules)(x, it, 4, recompute=recompute)
        return saved_dtypes_and_bytes(fn)
    fp32_dtypes, fp32_bytes = run(None)
    amp_dtypes, amp_bytes = run(torch.bfloat16)
    assert fp32_dtypes == {torch.float32} and amp_dtypes == {torch.bfloat16}
    assert 2 * amp_bytes == fp32_bytes


def scaled_step(modules, forward, init_scale):
    """One fp16 step with a ``GradScaler``: returns (stepped, scale after, finite grads)."""
    optimizer = torch.optim.SGD(modules.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=init_scale)
    before = [p.detach().clone() for p in modules.parameters()]
    torch.manual_seed(1)
    with torch.autocast('cpu', dtype=torch.float16):
        out = forward(modules)
    loss = (out.float() * torch.randn(out.shape)).sum()
    scaler.scale(loss).backward()
    finite = all(torch.isfinite(p.grad).all() for p in modules.parameters()
                 if p.grad is not None)
    scaler.step(optimizer)
    scaler.update()
    stepped = any(not torch.equal(a, p) for a, p in zip(before, modules.parameters()))
    return stepped, scaler.get_scale(), finite


@pytest.mark.parametrize('overflow', [False, True], ids=['finite', 'overflow_in_unit'])
def test_grad_scaler_steps_or_skips_exactly_as_for_the_dense_modules(overflow):
    """Scaled fp16 gradients flow through SBP units; an overflow produced inside a
    unit (its BatchNorm backward amplifies a finite incoming gradient beyond fp16's
    range) makes the scaler skip the step and halve its scale, as it does for the
    same modules run densely."""
    torch.manual_seed(0)
    modules = bottleneck()
    if overflow:  # a near-constant conv3 output: BatchNorm's 1/std amplifies ~300x
        modules['conv3'].weight.data.mul_(1e-4)
    x = torch.randn(2, 16, 16, 8)
    it = iteration(MASKS['grid'])
    init_scale = 2.0**8
    sbp = scaled_step(copy.deepcopy(modules),
                      lambda m: bottleneck_program(m)(x, it, 4), init_scale)
    dense = scaled_step(copy.deepcopy(modules),
                        lambda m: reference_program(bottleneck_program(m), x, it, 4), init_scale)
    assert sbp == dense
    if overflow:
        assert sbp == (False, init_scale / 2, False)
    else:
        assert sbp == (True, init_scale, True)


@pytest.mark.parametrize('with_cp', [False, True], ids=['sbp', 'sbp_cp'])
def test_resnet_sbp_under_autocast_equals_resnet_with_reference_gradients(with_cp):
    """``ResNetSBP`` (with checkpointing too) under bf16 autocast: outputs equal
    mmdet's ``ResNet`` under the same autocast; gradients match the reference."""
    kwargs = dict(norm_eval=False, frozen_stages=-1, with_cp=with_cp)
    sbp, dense = resnet_pair(50, sbp=dict(keep_ratio=0.5), **kwargs)
    fp32 = ResNet(depth=50, **kwargs)
    fp32.load_state_dict(dense.state_dict())
    fp32.train()
    x = torch.randn(2, 3, 64, 96)
    with autocast(torch.bfloat16):
        outs = sbp(x)
    iteration_ = sbp.sbp_iteration
    for model in (dense, fp32):
        add_reference_hooks(enabled_blocks(model, sbp.sbp_blocks), iteration_, x.shape[2])
    with autocast(torch.bfloat16):
        ref_outs = dense(x)
    fp32_outs = fp32(x)
    grads = [torch.randn(o.shape) for o in outs]
    for model_outs in (outs, ref_outs, fp32_outs):
        sum((o.float() * g).sum() for o, g in zip(model_outs, grads)).backward()
    for o, r in zip(outs, ref_outs):
        assert o.dtype == torch.bfloat16 and torch.equal(o, r)
    for (name, p), (_, q), (_, f) in zip(sbp.named_parameters(), dense.named_parameters(),
                                         fp32.named_parameters()):
        assert p.grad.dtype == torch.float32, name
        assert_amp_close(p.grad, q.grad, f.grad, torch.bfloat16, name)


def test_whole_detector_trains_under_cpu_autocast_with_dense_loss_and_half_the_storage():
    """Faster R-CNN with ResNetSBP + FPNSBP under bf16 autocast on the CPU (mmcv's
    NMS and RoIAlign run in fp32 there, see ``sbp_mmdet.amp``): the loss equals the
    dense detector's under the same autocast, gradients are finite and fp32, and the
    SBP stages store half of what they store in fp32 (no weight copies: the dense
    modules' autocast keeps a half-precision copy of each weight for backward)."""
    sbp_model = build_detector(small_faster_rcnn_cfg(True))
    dense = build_detector(small_faster_rcnn_cfg(False))
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, [(96, 128)] * 2)
    stages = ('layer1', 'layer2', 'layer3')
    losses, saved = {}, {}
    sbp_fp32 = copy.deepcopy(sbp_model)  # the same masks
    for name, model, dtype in (('sbp', sbp_model, torch.bfloat16), ('dense', dense, torch.bfloat16),
                               ('sbp_fp32', sbp_fp32, None)):
        meter = SavedTensorMeter(model, {s: getattr(model.backbone, s) for s in stages})
        with meter.measure(), cpu_autocast_fallbacks(model), autocast(dtype):
            losses[name] = total_loss(model, data)
        saved[name] = sum(meter.by_component[s] for s in stages)
    torch.testing.assert_close(losses['sbp'], losses['dense'], rtol=0, atol=0)
    losses['sbp'].backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32
               for p in sbp_model.parameters() if p.grad is not None)
    assert saved['sbp'] * 2 == saved['sbp_fp32']
    assert saved['sbp'] < 0.6 * saved['dense']


def test_fallbacks_leave_no_hooks_behind():
    model = build_detector(small_faster_rcnn_cfg(True))
    hooks_before = len(model.rpn_head._forward_hooks)
    with cpu_autocast_fallbacks(model):
        assert len(model.rpn_head._forward_hooks) == hooks_before + 1
    assert len(model.rpn_head._forward_hooks) == hooks_before
