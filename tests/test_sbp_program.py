"""SBP units: exact forward, gradients equal to the reference, real memory saving."""
import copy

import pytest
import torch
from torch import nn

from sbp_mmdet.sbp import RowLocal, SavedTensorMeter, SBPProgram, TailOp, conv_unit

from sbp_builders import (basic, basic_program, bottleneck, bottleneck_program, fpn_output,
                          fpn_program)
from sbp_reference import MASKS, assert_same, compare, iteration, reference_program

RECOMPUTE = dict(argnames='recompute', argvalues=[False, True, 'all'],
                 ids=['store', 'recompute', 'recompute_all'])


@pytest.mark.parametrize('train', [True, False], ids=['train_bn', 'eval_bn'])
@pytest.mark.parametrize(**RECOMPUTE)
@pytest.mark.parametrize('mask', list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize('height', [32, 29, 3])
def test_bottleneck_matches_the_reference(train, recompute, mask, height):
    assert_same(*compare(lambda: bottleneck(train=train), bottleneck_program,
                         (2, 16, height, 11), MASKS[mask], recompute=recompute))


@pytest.mark.parametrize(**RECOMPUTE)
@pytest.mark.parametrize('mask', list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize('height', [16, 13, 1])
def test_basic_block_with_3x3_input_conv_matches_the_reference(recompute, mask, height):
    assert_same(*compare(basic, basic_program, (2, 8, height, 7), MASKS[mask],
                         stride=8, recompute=recompute))


def tower(depth=3, channels=8) -> nn.ModuleDict:
    """A dense head's tower: 3x3 conv + ReLU layers, then a 3x3 output conv."""
    convs = {f'conv{i}': nn.Conv2d(channels, channels, 3, 1, 1) for i in range(depth)}
    return nn.ModuleDict(dict(convs, out=nn.Conv2d(channels, 5, 3, 1, 1)))


def tower_program(m) -> SBPProgram:
    depth = len(m) - 1
    units = [conv_unit(f'conv{i}', f'conv{i - 1}' if i else 'input', m[f'conv{i}'],
                       relu_after=True) for i in range(depth)]
    return SBPProgram(units + [conv_unit('out', f'conv{depth - 1}', m['out'])])


@pytest.mark.parametrize(**RECOMPUTE)
@pytest.mark.parametrize('mask', list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize('height', [40, 23, 1])
def test_head_tower_matches_the_reference(recompute, mask, height):
    assert_same(*compare(tower, tower_program, (2, 8, height, 9), MASKS[mask], stride=4,
                         recompute=recompute))


def test_recompute_all_stores_only_the_tower_input_at_its_halo_rows():
    """A tower's every layer feeds a 3x3 conv, so ``recompute=True`` stores each
    layer's output at kept rows plus halo; ``'all'`` stores the input alone, at
    the rows the layers' stacked halos reach."""
    torch.manual_seed(0)
    n, c, h, w = 2, 16, 64, 24
    modules = tower(depth=3, channels=c)
    x = torch.randn(n, c, h, w, requires_grad=True)
    mask = [True, True, False, False, False, False] * 3  # kept 8, dropped 16 rows at stride 4
    it = iteration(mask)
    kept = it.kept_rows(4, h)
    reach = torch.unique(torch.clamp(kept[:, None] + torch.arange(-4, 5), 0, h - 1))
    stored = saved_bytes(tower_program, modules, x, mask, recompute=True)
    recomputed_all = saved_bytes(tower_program, modules, x, mask, recompute='all')
    assert recomputed_all == n * c * len(reach) * w * 4 < 0.5 * stored


def test_split_outputs_leaves_the_trunk_and_returns_the_output_layers():
    """A head's two output convs on one shared tower layer: the trunk ends at
    that layer, output once."""
    m = tower(depth=2)
    head = SBPProgram([conv_unit('conv0', 'input', m['conv0'], relu_after=True),
                       conv_unit('conv1', 'conv0', m['conv1'], relu_after=True),
                       conv_unit('cls', 'conv1', m['out']), conv_unit('reg', 'conv1', m['out'])],
                      outputs=('cls', 'reg'), where='head')
    trunk, outputs = head.split_outputs()
    assert [unit.name for unit in trunk.units] == ['conv0', 'conv1']
    assert trunk.outputs == ('conv1',) and trunk.where == 'head'
    assert [unit.name for unit in outputs] == ['cls', 'reg']


@pytest.mark.parametrize('mask', list(MASKS), ids=list(MASKS))
def test_conv_with_bias_and_no_norm_matches_the_reference(mask):
    assert_same(*compare(fpn_output, fpn_program, (2, 8, 19, 9), MASKS[mask]))


def conv_pair(kernel=3, stride=1, bias=True) -> nn.ModuleDict:
    return nn.ModuleDict(dict(
        first=nn.Conv2d(8, 8, kernel, stride, kernel // 2, bias=bias),
        second=nn.Conv2d(8, 6, 3, 1, 1)))


def conv_pair_program(m, relu_between=False) -> SBPProgram:
    return SBPProgram([conv_unit('first', 'input', m['first'], relu_after=relu_between),
                       conv_unit('second', 'first', m['second'])])


@pytest.mark.parametrize('units,outputs,refused', [
    (lambda m: [conv_unit('first', 'input', m['first']),
                conv_unit('second', 'first', m['second'], relu_after=True)], None, 'second'),
    (lambda m: [conv_unit('first', 'input', m['first']),
                conv_unit('second', 'first', m['second'])], ('first', 'second'), 'first'),
    (lambda m: [conv_unit('first', 'input', m['first'])], None, 'first'),
], ids=['with_tail', 'read_by_a_unit', 'on_the_input'])
def test_split_outputs_refuses_outputs_that_are_not_a_last_single_layer(units, outputs, refused):
    program = SBPProgram(units(conv_pair()), outputs, where='pair')
    with pytest.raises(ValueError, match=f'pair: dense outputs need output units that are a '
                                         f'single layer on an SBP unit and read by no other '
                                         f"unit; '{refused}' is not"):
        program.split_outputs()


@pytest.mark.parametrize('mask', list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize('kernel,stride,bias', [(3, 1, True), (3, 2, False), (1, 1, True)])
@pytest.mark.parametrize('height', [19, 1])
@pytest.mark.parametrize('relu_between', [False, True], ids=['conv_conv', 'conv_relu_conv'])
def test_exact_input_grad_matches_its_reference_and_gives_the_dense_input_gradient(
        mask, kernel, stride, bias, height, relu_between):
    """``exact_input_grad``: parameters learn on kept rows as with SBP, the input
    gets every row's gradient (two chained convs, with or without a ReLU
    between them, as in a head's tower: the first's too)."""
    torch.manual_seed(0)
    modules = conv_pair(kernel, stride, bias)
    ref_modules, dense = copy.deepcopy(modules), copy.deepcopy(modules)
    x = torch.randn(2, 8, height, 9, requires_grad=True)
    x_ref, x_dense = (x.detach().clone().requires_grad_() for _ in range(2))
    it = iteration(MASKS[mask])
    y = conv_pair_program(modules, relu_between)(x, it, 4, exact_input_grad=True)
    y_ref = reference_program(conv_pair_program(ref_modules, relu_between), x_ref, it, 4,
                              exact_input_grad=True)
    first = dense['first'](x_dense)
    y_dense = dense['second'](torch.relu(first) if relu_between else first)
    grad = torch.randn_like(y)
    for out in (y, y_ref, y_dense):
        (out * grad).sum().backward()
    assert torch.equal(y, y_dense)
    assert_same(modules, ref_modules, x, x_ref, y, y_ref)
    torch.testing.assert_close(x.grad, x_dense.grad)
    if mask != 'all' and height > 1:  # the weights did not see the dropped rows
        assert not torch.allclose(modules['first'].weight.grad, dense['first'].weight.grad)


def test_exact_input_grad_stores_what_sbp_stores_plus_one_bit_per_relu_output():
    torch.manual_seed(0)
    modules = conv_pair()
    x = torch.randn(2, 8, 64, 16, requires_grad=True)
    stored = {}
    for relu_between in (False, True):
        for exact in (False, True):
            meter = SavedTensorMeter(modules)
            with meter.measure():
                conv_pair_program(modules, relu_between)(x, iteration(MASKS['grid']), 4,
                                                         exact_input_grad=exact)
            stored[relu_between, exact] = meter.total_bytes
    assert stored[False, True] == stored[False, False] > 0
    assert stored[True, True] == stored[True, False] + x.numel() // 8  # first: 8 -> 8 channels


@pytest.mark.parametrize('recompute', [False, True], ids=['store', 'recompute'])
@pytest.mark.parametrize('mask', list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize('height', [32, 29, 3])
def test_exact_input_grad_through_eval_mode_bottleneck_matches_its_reference(
        recompute, mask, height):
    """A ResNet bottleneck with norm_eval (BN, residual add, ReLU): the input
    gets the dense gradient, parameters learn on the kept rows."""
    torch.manual_seed(0)
    modules = bottleneck(train=False)
    ref_modules, dense = copy.deepcopy(modules), copy.deepcopy(modules)
    x = torch.randn(2, 16, height, 11, requires_grad=True)
    x_ref, x_dense = (x.detach().clone().requires_grad_() for _ in range(2))
    it = iteration(MASKS[mask])
    y = bottleneck_program(modules)(x, it, 4, recompute=recompute, exact_input_grad=True)
    y_ref = reference_program(bottleneck_program(ref_modules), x_ref, it, 4,
                              exact_input_grad=True)
    m = dense
    a = torch.relu(m['norm1'](m['conv1'](x_dense)))
    a = torch.relu(m['norm2'](m['conv2'](a)))
    y_dense = torch.relu(m['norm3'](m['conv3'](a)) + m['dnorm'](m['dconv'](x_dense)))
    grad = torch.randn_like(y)
    for out in (y, y_ref, y_dense):
        (out * grad).sum().backward()
    assert_same(modules, ref_modules, x, x_ref, y, y_ref)
    torch.testing.assert_close(x.grad, x_dense.grad, atol=1e-5, rtol=1e-4)


def test_exact_input_grad_is_refused_for_train_mode_norms_and_other_tails():
    with pytest.raises(TypeError, match=r"conv1: exact input gradients need BatchNorm in eval "
                                        r"mode, and this one is in train mode: "
                                        r"use norm_eval=True"):
        bottleneck_program(bottleneck(train=True)).check_modes(exact_input_grad=True)
    gelu = SBPProgram([conv_unit('conv', 'input', nn.Conv2d(4, 4, 3, 1, 1)).with_tail(
        RowLocal(nn.GELU()))])
    with pytest.raises(TypeError, match=r"block: exact input gradients need convolutions "
                                        r"followed by eval-mode BatchNorm, residual adds and "
                                        r"ReLUs; unit 'conv' is ConvMix \+ \['RowLocal'\]"):
        gelu.check_exact_input_grad('block')


class Doubling(TailOp):
    """A tail op that is new to the engine and gives its input gradient."""

    gives_input_grad = True

    def reference(self, x, other):
        return 2 * x

    def input_grad(self, grad, state):
        return 2 * grad


@pytest.mark.parametrize('mask', ['grid', 'random'])
def test_a_new_tail_op_that_gives_its_input_gradient_runs_with_exact_input_grad(mask):
    """The op declares ``gives_input_grad`` and ``input_grad``: no engine edit."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, 1, 1)
    ref_conv, dense_conv = copy.deepcopy(conv), copy.deepcopy(conv)

    def program_of(c):
        return SBPProgram([conv_unit('conv', 'input', c).with_tail(Doubling())])
    x = torch.randn(2, 8, 16, 9, requires_grad=True)
    x_ref, x_dense = (x.detach().clone().requires_grad_() for _ in range(2))
    it = iteration(MASKS[mask])
    y = program_of(conv)(x, it, 4, exact_input_grad=True)
    y_ref = reference_program(program_of(ref_conv), x_ref, it, 4, exact_input_grad=True)
    y_dense = 2 * dense_conv(x_dense)
    grad = torch.randn_like(y)
    for out in (y, y_ref, y_dense):
        (out * grad).sum().backward()
    assert torch.equal(y, y_dense)
    assert_same(nn.ModuleDict(dict(conv=conv)), nn.ModuleDict(dict(conv=ref_conv)),
                x, x_ref, y, y_ref)
    torch.testing.assert_close(x.grad, x_dense.grad)


def test_full_mask_is_plain_backprop():
    torch.manual_seed(0)
    modules = bottleneck()
    dense = copy.deepcopy(modules)
    x = torch.randn(2, 16, 24, 10, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    y = bottleneck_program(modules)(x, iteration(MASKS['all']), 4)
    m = dense
    a = torch.relu(m['norm1'](m['conv1'](x_dense)))
    a = torch.relu(m['norm2'](m['conv2'](a)))
    y_dense = torch.relu(m['norm3'](m['conv3'](a)) + m['dnorm'](m['dconv'](x_dense)))
    y.sum().backward()
    y_dense.sum().backward()
    assert_same(modules, dense, x, x_dense, y, y_dense)


def test_no_kept_rows_gives_zero_gradients():
    modules = bottleneck()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    y = bottleneck_program(modules)(x, iteration([False] * 10), 4)
    y.sum().backward()
    assert x.grad.abs().sum() == 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in modules.parameters())


def test_inverse_keep_scales_parameter_gradients_by_the_realised_ratio():
    # all rows of the 16x? map at stride 8 follow the grid: ratio 0.5 exactly
    out = compare(lambda: fpn_output(), fpn_program, (2, 8, 16, 9), MASKS['grid'],
                  grad_scale='inverse_keep')
    assert_same(*out, param_scale=2.0)


def saved_bytes(program_of, modules, x, mask, stride=4, recompute=False):
    meter = SavedTensorMeter(modules)
    with meter.measure():
        if mask is None:
            m = modules
            a = torch.relu(m['norm1'](m['conv1'](x)))
            a = torch.relu(m['norm2'](m['conv2'](a)))
            torch.relu(m['norm3'](m['conv3'](a)) + m['dnorm'](m['dconv'](x)))
        else:
            program_of(modules)(x, iteration(mask), stride, recompute=recompute)
    return meter.total_bytes


def test_saved_bytes_shrink_to_the_derived_bound():
    """At keep 0.5 a bottleneck stores: its input and z1 (plus the 3x3 halo)
    at kept rows of the input map, and z2, z3, the shortcut's z at kept rows of
    the output map. Nothing else (no full-size tensor) may be saved."""
    torch.manual_seed(0)
    n, cin, mid, h, w = 2, 64, 16, 64, 32
    modules = bottleneck(cin, mid, stride=2)
    x = torch.randn(n, cin, h, w, requires_grad=True)
    mask = MASKS['grid']
    it = iteration(mask)
    kept_in = len(it.kept_rows(4, h))
    kept_out = len(it.kept_rows(8, h // 2))
    halo_rows = kept_in + kept_out  # one extra input row above each kept output row pair
    floats = (cin * kept_in + mid * min(h, halo_rows)) * w + (
        mid + 4 * mid + 4 * mid) * kept_out * (w // 2)
    bound = n * 4 * floats
    sbp = saved_bytes(bottleneck_program, modules, x, mask)
    dense = saved_bytes(bottleneck_program, modules, x, None)
    assert sbp <= bound
    assert sbp < 0.55 * dense
    recomputed = saved_bytes(bottleneck_program, modules, x, mask, recompute=True)
    assert recomputed <= n * 4 * (cin * kept_in + mid * min(h, halo_rows)) * w < sbp


def test_no_grad_builds_no_graph():
    modules = bottleneck()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y = bottleneck_program(modules)(x, iteration(MASKS['grid']), 4)
    assert y.grad_fn is None


@pytest.mark.parametrize('per_image', [False, True])
def test_row_sum_adds_every_contribution_once_into_a_zero_map(per_image):
    from sbp_mmdet.sbp.rows import RowSum
    torch.manual_seed(0)
    shape = (2, 3, 7, 5)
    kept, halo = torch.tensor([1, 2, 5]), torch.tensor([0, 1, 2, 3, 5, 6])
    if per_image:
        kept = torch.stack([kept, kept + 1])
        halo = torch.stack([halo, torch.tensor([0, 2, 3, 4, 5, 6])])
    parts = [(kept, torch.randn(2, 3, 3, 5)), (halo, torch.randn(2, 3, 6, 5)),
             (kept.clone(), torch.randn(2, 3, 3, 5))]
    total = RowSum(shape, torch.float64)
    expected = torch.zeros(shape, dtype=torch.float64)
    for rows, grad in parts:
        total.add(rows, grad)
        for i in range(2):
            image_rows = rows[i] if per_image else rows
            expected[i][:, image_rows] += grad[i].double()
    assert len(total.parts) == 2  # equal row sets were summed packed
    torch.testing.assert_close(total.full(torch.empty(0)), expected, rtol=0, atol=1e-12)
    assert RowSum(shape, torch.float32).full(torch.empty(0)).count_nonzero() == 0


def test_row_sum_of_every_row_returns_the_gradient_without_scattering_and_never_writes_it():
    from sbp_mmdet.sbp.rows import RowSum
    every, grad = torch.arange(4), torch.randn(1, 2, 4, 3)
    alone = RowSum(grad.shape, grad.dtype)
    alone.add(every, grad)
    assert alone.full(grad) is grad
    before, extra = grad.clone(), torch.randn(1, 2, 1, 3)
    mixed = RowSum(grad.shape, grad.dtype)
    mixed.add(every, grad)
    mixed.add(torch.tensor([2]), extra)
    out = mixed.full(grad)
    torch.testing.assert_close(grad, before, rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 2:3], before[:, :, 2:3] + extra)
