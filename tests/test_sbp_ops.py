"""Every op of the unit vocabulary: exact forward, gradients equal to the reference."""
import copy

import pytest
import torch
from mmcv.cnn.bricks import DropPath as MMCVDropPath
from mmcv.cnn.bricks import Linear as MMCVLinear
from torch import nn

from sbp_mmdet.sbp import (Add, BatchNorm, ChannelsLast, ConvMix, DropPath, GroupNorm, IdentityMix,
                           LayerScale, LinearMix, RowLocal, SavedTensorMeter, SBPProgram, UnfoldMix,
                           Unit, relu)

from sbp_builders import random_bn
from sbp_reference import (MASKS, assert_amp_close, assert_grad_close, assert_same, backward_both,
                           compare, iteration, reference_program, run_three_ways)


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block written with plain modules (the dense model to match)."""

    def __init__(self, channels=8, drop_prob=0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.rand(channels) + 0.5)
        self.drop_path = MMCVDropPath(drop_prob)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.drop_path(y * self.gamma.view(-1, 1, 1))

    def sbp_program(self):
        """The block as one SBP unit: a depthwise 7x7 conv and a row-local tail."""
        tail = (ChannelsLast(self.norm, self.pwconv1, self.act, self.pwconv2),
                LayerScale(self.gamma), DropPath(self.drop_path), Add('input'))
        return SBPProgram([Unit('block', 'input', ConvMix(self.dwconv), tail)])

    def sbp_program_stored(self):
        """The block as three units whose pointwise layers are stored (``LinearMix``),
        as ``ConvNeXtSBP`` runs it."""
        return SBPProgram([
            Unit('depthwise', 'input', ConvMix(self.dwconv), (ChannelsLast(self.norm),)),
            Unit('pointwise1', 'depthwise', LinearMix(self.pwconv1), (ChannelsLast(self.act),)),
            Unit('pointwise2', 'pointwise1', LinearMix(self.pwconv2),
                 (LayerScale(self.gamma), DropPath(self.drop_path), Add('input')))])


def convnext():
    return nn.ModuleDict(dict(block=ConvNeXtBlock()))


def convnext_program(m):
    return m['block'].sbp_program()


def convnext_stored_program(m):
    return m['block'].sbp_program_stored()


def convnext_frozen_pointwise():
    """A frozen first pointwise layer: no gradient for it, the input's still flows."""
    modules = convnext()
    modules['block'].pwconv1.requires_grad_(False)
    return modules


def act_block(act):
    def build():
        return nn.ModuleDict(dict(conv=nn.Conv2d(8, 8, 3, 1, 1, bias=False),
                                  norm=random_bn(8, True), act=act))
    return build


def act_program(m):
    return SBPProgram([Unit('conv', 'input', ConvMix(m['conv']),
                            (BatchNorm(m['norm']), RowLocal(m['act'])))])


def grouped_dilated():
    return nn.ModuleDict(dict(conv=nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2,
                                             groups=4, bias=False),
                              norm=random_bn(12, True)))


def grouped_dilated_program(m):
    return SBPProgram([Unit('conv', 'input', ConvMix(m['conv']), (BatchNorm(m['norm']), relu()))])


def tail_conv_then_bn():
    """BatchNorm deep in a tail: its statistics term must stay on kept rows."""
    return nn.ModuleDict(dict(conv=nn.Conv2d(8, 8, 3, 1, 1, bias=False),
                              pw=nn.Conv2d(8, 16, 1, bias=False), norm=random_bn(16, True)))


def tail_conv_then_bn_program(m):
    return SBPProgram([Unit('conv', 'input', ConvMix(m['conv']),
                            (RowLocal(m['pw']), BatchNorm(m['norm']), RowLocal(nn.SiLU())))])


def group_norm_block(affine=True):
    def build():
        norm = nn.GroupNorm(4, 8, affine=affine)
        if affine:  # not the identity init: the affine gradient terms must show
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
        return nn.ModuleDict(dict(conv=nn.Conv2d(8, 8, 3, 1, 1), norm=norm, act=nn.ReLU()))
    return build


def group_norm_program(m):
    """GroupNorm (FCOS/ATSS heads): per-image group statistics, kept exactly on kept rows."""
    return SBPProgram([Unit('conv', 'input', ConvMix(m['conv']),
                            (GroupNorm(m['norm']), RowLocal(m['act'])))])


def mlp_after_conv():
    """A unit without a row-mixing op reading the previous unit."""
    return nn.ModuleDict(dict(conv=nn.Conv2d(8, 8, 3, 1, 1), norm=nn.LayerNorm(8),
                              fc=nn.Linear(8, 8)))


def mlp_after_conv_program(m):
    return SBPProgram([Unit('conv', 'input', ConvMix(m['conv']), (relu(),)),
                       Unit('mlp', 'conv', IdentityMix(),
                            (ChannelsLast(m['norm'], m['fc']), Add('conv')))])


CASES = {
    'gelu': (act_block(nn.GELU()), act_program),
    'silu': (act_block(nn.SiLU()), act_program),
    'grouped_dilated_strided_conv': (grouped_dilated, grouped_dilated_program),
    '1x1_conv_then_bn_in_tail': (tail_conv_then_bn, tail_conv_then_bn_program),
    'layernorm_linear_no_mix': (mlp_after_conv, mlp_after_conv_program),
    'groupnorm': (group_norm_block(), group_norm_program),
    'groupnorm_no_affine': (group_norm_block(affine=False), group_norm_program),
    'convnext_block': (convnext, convnext_program),
    'convnext_block_linear_mix': (convnext, convnext_stored_program),
    'linear_mix_frozen_weight': (convnext_frozen_pointwise, convnext_stored_program),
}


@pytest.mark.parametrize('recompute', [False, True], ids=['store', 'recompute'])
@pytest.mark.parametrize('mask', list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize('height', [29, 16, 1])
@pytest.mark.parametrize('case', list(CASES))
def test_op_matches_the_reference(case, height, mask, recompute):
    build, program_of = CASES[case]
    modules, ref_modules, x, x_ref, y, y_ref = compare(build, program_of, (4, 8, height, 7),
                                                       MASKS[mask], recompute=recompute,
                                                       forward_seed=1)
    assert torch.equal(y, y_ref)
    assert_grad_close(x.grad, x_ref.grad, 'input')
    for (name, p), (_, q) in zip(modules.named_parameters(), ref_modules.named_parameters()):
        if q.requires_grad:
            assert_grad_close(p.grad, q.grad, name)
        else:  # frozen: no gradient, as in the reference
            assert p.grad is None and q.grad is None, name
    for a, b in zip(modules.buffers(), ref_modules.buffers()):
        assert torch.equal(a, b)  # running statistics updated once, identically


@pytest.mark.parametrize('channels,width', [(8, 9), (16, 24), (64, 40)])
def test_convnext_block_forward_is_the_dense_block_bit_for_bit(channels, width):
    torch.manual_seed(0)
    block = ConvNeXtBlock(channels).train()
    x = torch.randn(4, channels, 21, width)
    torch.manual_seed(3)
    dense = block(x)
    torch.manual_seed(3)
    sbp = block.sbp_program()(x, iteration(MASKS['random']), 4)
    assert torch.equal(sbp, dense)
    assert (dense == x).flatten(1).all(1).any()  # a path was dropped


def test_drop_path_backward_reuses_the_forward_mask():
    """Samples whose path DropPath dropped pass the output gradient to the input
    unchanged (identity shortcut only); the others do not."""
    torch.manual_seed(0)
    block = ConvNeXtBlock(drop_prob=0.5).train()
    x = torch.randn(8, 8, 12, 6, requires_grad=True)
    torch.manual_seed(5)
    out = block.sbp_program()(x, iteration(MASKS['all']), 4)
    dropped = (out == x).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < 8
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    assert torch.equal(x.grad[dropped], grad[dropped])
    assert not torch.isclose(x.grad[~dropped], grad[~dropped]).all()


def convnext_storage_case():
    """A 32-channel block, its input (2, 32, 64, 16) and a grid iteration at
    keep 0.5, with the kept rows and the rows the 7x7 conv reads for them."""
    torch.manual_seed(0)
    block = ConvNeXtBlock(channels=32, drop_prob=0.0).train()
    x = torch.randn(2, 32, 64, 16, requires_grad=True)
    it = iteration(MASKS['grid'])
    kept_rows = it.kept_rows(4, x.shape[2])
    halo_in = len(ConvMix(block.dwconv).reads(kept_rows, x.shape[2]))
    return block, x, it, len(kept_rows), halo_in


def test_convnext_block_stores_the_conv_output_and_input_at_kept_rows_only():
    """At keep 0.5 the block stores its input on kept rows plus the 7x7 halo and
    the depthwise output on kept rows: nothing of the 4x wide MLP."""
    block, x, it, kept, halo_in = convnext_storage_case()
    n, c, _, w = x.shape
    meters = {}
    for name, run in (('dense', lambda: block(x)),
                      ('sbp', lambda: block.sbp_program()(x, it, 4))):
        meters[name] = SavedTensorMeter(block)
        with meters[name].measure():
            run()
    assert meters['sbp'].total_bytes <= 4 * n * c * w * (halo_in + kept)
    assert meters['sbp'].total_bytes < 0.2 * meters['dense'].total_bytes


def test_linear_mix_stores_its_output_at_kept_rows_and_backward_reruns_no_linear():
    """The three-unit block stores, per kept row, its input (plus the 7x7 halo)
    and each unit's leading output (C + 4C + C channels), nothing at dropped
    rows; its backward calls no ``nn.Linear`` (the products run by hand)."""
    block, x, it, kept, halo_in = convnext_storage_case()
    n, c, _, w = x.shape
    meter = SavedTensorMeter(block)
    with meter.measure():
        out = block.sbp_program_stored()(x, it, 4)
    assert meter.total_bytes <= 4 * n * w * (c * halo_in + 6 * c * kept)
    calls = []
    for linear in (block.pwconv1, block.pwconv2):
        linear.register_forward_hook(lambda *args: calls.append(1))
    out.sum().backward()
    assert not calls and block.pwconv1.weight.grad is not None


def test_linear_mix_takes_plain_linear_layers_only():
    with pytest.raises(TypeError, match='pw: LinearMix supports nn.Linear, got Conv2d'):
        LinearMix(nn.Conv2d(4, 4, 1), where='pw')

    class ScaledLinear(nn.Linear):  # a subclass with its own forward
        pass
    with pytest.raises(TypeError, match='pw: LinearMix supports nn.Linear, got ScaledLinear'):
        LinearMix(ScaledLinear(4, 4), where='pw')
    LinearMix(MMCVLinear(4, 4))  # mmcv's FFN layers: nn.Linear that accepts empty inputs


class PatchMerging(nn.Module):
    """2x2 patches, a norm and a linear reduction (mmdet's ``PatchMerging`` on a map)."""

    def __init__(self, channels=4):
        super().__init__()
        self.norm = nn.LayerNorm(4 * channels)
        self.reduction = nn.Linear(4 * channels, 2 * channels, bias=False)

    def sbp_program(self):
        return SBPProgram([Unit('unfold', 'input', UnfoldMix(2), (ChannelsLast(self.norm),)),
                           Unit('reduction', 'unfold', LinearMix(self.reduction))])


@pytest.mark.parametrize('mask', ['grid', 'random'])
@pytest.mark.parametrize('recompute', [False, True])
def test_unfold_mix_patch_merging_equals_the_reference(mask, recompute):
    # 80 rows at stride 2: 40 output rows at stride 4 under the 10-row base mask
    assert_same(*compare(PatchMerging, PatchMerging.sbp_program, (2, 4, 80, 10), MASKS[mask],
                         stride=2, recompute=recompute))


def test_unfold_mix_stores_only_the_input_rows_under_kept_outputs():
    """Merging stores the input's rows under the kept output rows (two per kept
    row) and nothing else: backward re-runs the unfold and the norm from them."""
    block, x = PatchMerging(), torch.randn(2, 4, 80, 10, requires_grad=True)
    meter = SavedTensorMeter(block)
    with meter.measure():
        block.sbp_program()(x, iteration(MASKS['grid']), 2)
    kept = 20  # of 40 output rows
    assert meter.total_bytes == 4 * x.numel() * (2 * kept) // 80


def test_unfold_mix_is_nn_unfold_and_refuses_odd_maps():
    x = torch.randn(2, 3, 6, 4)
    assert torch.equal(UnfoldMix(2).forward(x).flatten(2), nn.Unfold(2, stride=2)(x))
    with pytest.raises(ValueError, match='5x4 map is not a multiple of the 2x2 patches'):
        UnfoldMix(2).forward(x[:, :, :5])


def test_a_tail_conv_must_be_row_local():
    with pytest.raises(TypeError, match='must be 1x1, stride 1'):
        RowLocal(nn.Conv2d(4, 4, 3, padding=1))


@pytest.mark.parametrize('case', ['convnext_block', 'convnext_block_linear_mix', 'gelu',
                                  'layernorm_linear_no_mix', 'groupnorm'])
def test_tails_rerun_under_the_forward_autocast(case):
    """Under bf16 autocast the tail is re-run in the forward's precision: the
    output equals the reference's bit for bit, gradients are within autocast's
    own error of it (the tolerance of ``test_sbp_amp``)."""
    build, program_of = CASES[case]
    if case.startswith('convnext_block'):  # no DropPath: the three runs draw different masks
        def build():
            return nn.ModuleDict(dict(block=ConvNeXtBlock(drop_prob=0.0)))
    modules, inputs, outs = run_three_ways(build, program_of, (2, 8, 29, 7), 4,
                                           MASKS['random'], torch.bfloat16)
    assert torch.equal(outs['sbp'], outs['ref'])
    assert_amp_close(inputs['sbp'].grad, inputs['ref'].grad, inputs['fp32'].grad,
                     torch.bfloat16, 'input')
    named = [dict(m.named_parameters()) for m in (modules['sbp'], modules['ref'], modules['fp32'])]
    for name, param in named[0].items():
        assert param.grad.dtype == param.dtype, name
        assert_amp_close(param.grad, named[1][name].grad, named[2][name].grad, torch.bfloat16,
                         name)


def two_branch_head():
    return nn.ModuleDict(dict(a=nn.Conv2d(8, 8, 3, 1, 1), b=nn.Conv2d(8, 8, 3, 1, 1),
                              cls=nn.Conv2d(8, 3, 3, 1, 1), reg=nn.Conv2d(8, 4, 1)))


def two_branch_program(m):
    return SBPProgram([Unit('a', 'input', ConvMix(m['a']), (relu(),)),
                       Unit('b', 'input', ConvMix(m['b']), (relu(),)),
                       Unit('cls', 'a', ConvMix(m['cls'])),
                       Unit('reg', 'b', ConvMix(m['reg']))], outputs=('cls', 'reg'))


@pytest.mark.parametrize('recompute', [False, True], ids=['store', 'recompute'])
@pytest.mark.parametrize('mask', list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize('height', [29, 1])
def test_program_with_two_outputs_matches_the_reference(height, mask, recompute):
    """A head's two branches as one program: both outputs exact, gradients of
    a loss on both equal to the reference."""
    torch.manual_seed(0)
    modules = two_branch_head()
    ref_modules = copy.deepcopy(modules)
    x = torch.randn(2, 8, height, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    it = iteration(MASKS[mask])
    outs = two_branch_program(modules)(x, it, 8, recompute=recompute)
    ref_outs = reference_program(two_branch_program(ref_modules), x_ref, it, 8)
    backward_both(outs, ref_outs)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref_outs))
    assert_grad_close(x.grad, x_ref.grad, 'input')
    for (name, p), (_, q) in zip(modules.named_parameters(), ref_modules.named_parameters()):
        assert_grad_close(p.grad, q.grad, name)


def test_program_outputs_must_be_units():
    m = two_branch_head()
    with pytest.raises(ValueError, match=r"outputs \['head'\] are not units"):
        SBPProgram([Unit('a', 'input', ConvMix(m['a']))], outputs=('a', 'head'))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('kernel,dilation,groups', [(3, 1, 1), (3, 2, 1), (5, 1, 1), (3, 1, 4)])
@pytest.mark.parametrize('per_image', [False, True], ids=['shared', 'per_image'])
def test_same_conv_input_gradient_at_kept_rows_equals_the_halo_bands_there(
        dtype, kernel, dilation, groups, per_image):
    """A stride-1 "same" conv whose input keeps its gradient at the output's kept rows
    computes it there alone (``kept_input``): the values the halo'd bands give at those
    rows, bitwise, and the same parameter gradients."""
    from sbp_mmdet.sbp.rows import Packed, RowGeometry, conv_rows_backward, stack_rows
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation,
                     groups=groups).to(dtype)
    height = 23
    x = torch.randn(2, 8, height, 11, dtype=dtype)
    grad = torch.randn(2, 8, height, 11, dtype=dtype)
    kept = torch.tensor([0, 1, 2, 5, 6, 7, 8, 12, 13, 20, 21, 22])
    if per_image:
        kept = torch.stack([kept, torch.tensor([1, 2, 3, 4, 9, 10, 11, 15, 16, 17, 18, 19])])
        in_rows = stack_rows([RowGeometry.of(conv).input_rows(r, height) for r in kept], height)
        src = Packed(torch.gather(x, 2, in_rows[:, None, :, None].expand(2, 8, -1, 11)),
                     in_rows, height)
        grad_kept = torch.gather(grad, 2, kept[:, None, :, None].expand(2, 8, -1, 11))
    else:
        in_rows = RowGeometry.of(conv).input_rows(kept, height)
        src = Packed(x[:, :, in_rows], in_rows, height)
        grad_kept = grad[:, :, kept]
    halo = conv_rows_backward(conv, src, kept, grad_kept, True)
    at_kept = conv_rows_backward(conv, src, kept, grad_kept, True, kept_input=True)
    assert torch.equal(at_kept[0].rows, kept)
    assert at_kept[0].data.shape[2] == kept.shape[-1] < halo[0].data.shape[2]
    assert torch.equal(at_kept[0].data, halo[0].take(kept))
    assert torch.equal(at_kept[1], halo[1]) and torch.equal(at_kept[2], halo[2])
