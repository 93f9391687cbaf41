"""The reference semantics of SBP, written with plain autograd, and the
comparisons of SBP against it that the tests share.

Each SBP unit behaves like ``where(keep, unit(x), unit(x).detach())`` with the
output of every op inside it masked the same way (see
``sbp_mmdet/sbp/program.py``). This module builds that reference from the ops'
plain module calls (``reference_program``) or by forward hooks on the dense
modules (``add_reference_hooks``, ``head_hooks``), and compares SBP's values
and gradients with it (``compare``/``assert_same`` for programs, ``backward_both``,
``assert_grads_match``/``assert_matches_reference`` for models,
``run_three_ways``/``assert_amp_close`` under autocast). The test files
import it; no test file imports another.
"""
import copy
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sbp_mmdet.sbp import BatchNorm, SBPFeatures, SBPIteration, SBPProgram
from sbp_mmdet.sbp.program import INPUT

# base masks of 10 rows (a 160-pixel-high input at base stride 16)
MASKS = {
    'grid': [True, False] * 5,
    'random': [True, True, False, True, False, False, False, True, True, False],
    'all': [True] * 10,
}


def iteration(mask: Sequence[bool]) -> SBPIteration:
    """The SBP iteration of base mask ``mask`` at base stride 16."""
    return SBPIteration(torch.tensor(mask, dtype=torch.bool), base_stride=16)


def row_mask(iteration: SBPIteration, stride: int, like: Tensor) -> Tensor:
    """The keep mask of ``like``'s rows: (1, 1, H, 1), or (N, 1, H, 1) per image."""
    rows = iteration.kept_rows(stride, like.shape[2]).to(like.device)
    if rows.dim() == 2:
        mask = torch.zeros(len(rows), like.shape[2], dtype=torch.bool, device=like.device)
        return mask.scatter_(1, rows, True)[:, None, :, None]
    mask = torch.zeros(like.shape[2], dtype=torch.bool, device=like.device)
    mask[rows] = True
    return mask[None, None, :, None]


def masked(t: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, t, t.detach())


def weights_masked(conv: torch.nn.Conv2d, x: Tensor, out: Tensor, keep: Tensor) -> Tensor:
    """``where(keep, conv(x, w), conv(x, w.detach()))``: SBP on the weights only,
    the input's gradient exact (``exact_input_grad``); ``out`` is ``conv(x)``."""
    bias = None if conv.bias is None else conv.bias.detach()
    return torch.where(keep, out, conv._conv_forward(x, conv.weight.detach(), bias))


def _detached_params(op, x: Tensor, other) -> Tensor:
    """A tail op's value with its parameters detached (eval-mode BatchNorm,
    adds and ReLUs: the ops ``exact_input_grad`` runs)."""
    if isinstance(op, BatchNorm):
        norm = op.norm
        assert not norm.training
        return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight.detach(),
                            norm.bias.detach(), False, 0.0, norm.eps)
    return op.reference(x, other)


def reference_program(program: SBPProgram, x: Tensor, iteration: SBPIteration,
                      stride: int, exact_input_grad: bool = False
                      ) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Run ``program`` with plain autograd and per-unit keep masks."""
    values: Dict[str, Tensor] = {INPUT: x}
    strides = {INPUT: stride}
    for unit in program.units:
        strides[unit.name] = strides[unit.source] * unit.mix.geometry.stride
        out = unit.mix.reference(values[unit.source])
        keep = row_mask(iteration, strides[unit.name], out)
        if exact_input_grad:  # a conv, then eval-mode BatchNorm, adds, ReLUs
            out = weights_masked(unit.mix.conv, values[unit.source], out, keep)
            for op in unit.tail:
                other = values.get(op.reads)
                out = torch.where(keep, op.reference(out, other), _detached_params(op, out, other))
            values[unit.name] = out
            continue
        out = masked(out, keep)
        for op in unit.tail:
            out = masked(op.reference(out, values.get(op.reads)), keep)
        values[unit.name] = out
    outs = tuple(values[name] for name in program.outputs)
    return outs[0] if len(outs) == 1 else outs


def masking_hooks(iteration: SBPIteration, stride_of: Callable[[Tensor], int]):
    """A forward hook that masks a module's output like an SBP unit output."""
    def hook(module, args, output):
        return masked(output, row_mask(iteration, stride_of(output), output))
    return hook


def weight_masking_hook(iteration: SBPIteration, stride_of: Callable[[Tensor], int]):
    """A forward hook on an ``nn.Conv2d`` that masks it like ``exact_input_grad``."""
    def hook(conv, args, output):
        return weights_masked(conv, args[0], output, row_mask(iteration, stride_of(output),
                                                              output))
    return hook


# ---------------------------------------------------------------- programs


def compare(build: Callable[[], nn.Module], program_of: Callable[[nn.Module], SBPProgram],
            x_shape: Sequence[int], mask: Sequence, stride: int = 4,
            recompute: Union[bool, str] = False, grad_scale: str = 'none',
            forward_seed: Optional[int] = None, exact_input_grad: bool = False) -> tuple:
    """Run ``program_of(build())`` with SBP and its copy as the reference, from
    equal weights and inputs, and back-propagate one random output gradient
    through both; with ``forward_seed``, each forward starts from that random
    state (programs that draw, such as DropPath). ``mask``: one base mask, or
    one per image.

    Returns ``(modules, ref_modules, x, x_ref, y, y_ref)`` for ``assert_same``.
    """
    torch.manual_seed(0)
    modules = build()
    ref_modules = copy.deepcopy(modules)
    it = iteration(mask)
    x = torch.randn(*x_shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    if forward_seed is not None:
        torch.manual_seed(forward_seed)
    exact = dict(exact_input_grad=True) if exact_input_grad else {}
    y = program_of(modules)(x, it, stride, recompute=recompute, grad_scale=grad_scale, **exact)
    if forward_seed is not None:
        torch.manual_seed(forward_seed)
    y_ref = reference_program(program_of(ref_modules), x_ref, it, stride, exact_input_grad)
    backward_both([y], [y_ref])
    return modules, ref_modules, x, x_ref, y, y_ref


def backward_both(outs: Sequence[Tensor], ref_outs: Sequence[Tensor]) -> None:
    """Back-propagate the same random gradient of each output through ``outs`` and
    their references ``ref_outs``."""
    grads = [torch.randn_like(o) for o in outs]
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    sum((o * g).sum() for o, g in zip(ref_outs, grads)).backward()


def assert_same(modules: nn.Module, ref_modules: nn.Module, x: Tensor, x_ref: Tensor, y: Tensor,
                y_ref: Tensor, param_scale: float = 1.0) -> None:
    """What ``compare`` returns: equal outputs, input and parameter gradients
    (the reference's times ``param_scale``, relative to their scale: ``assert_grad_close``)
    and running statistics."""
    assert torch.equal(y, y_ref) or torch.allclose(y, y_ref, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    for (name, p), (_, q) in zip(modules.named_parameters(), ref_modules.named_parameters()):
        assert_grad_close(p.grad, q.grad * param_scale, name)
    for a, b in zip(modules.buffers(), ref_modules.buffers()):
        torch.testing.assert_close(a, b)  # running statistics updated once, identically


# ---------------------------------------------------------------- models

STRIDES = (4, 8, 16, 32)


def stride_from_height(image_height: int,
                       strides: Sequence[int] = STRIDES) -> Callable[[Tensor], int]:
    """The stride of a map from its height (mmdet's padded convs round up)."""
    def stride_of(output: Tensor) -> int:
        for s in strides:
            if math.ceil(image_height / s) == output.shape[2]:
                return s
        raise AssertionError(f'no stride gives height {output.shape[2]}')
    return stride_of


def add_reference_hooks(modules: Iterable[nn.Module], iteration: SBPIteration, image_height: int,
                        strides: Sequence[int] = STRIDES) -> list:
    """Mask the units of ``modules`` (blocks or conv modules: their convs, norms
    and outputs) like SBP defines them; the hooks' handles."""
    hook = masking_hooks(iteration, stride_from_height(image_height, strides))
    handles = []
    for module in modules:
        for child in module.modules():
            if isinstance(child, (nn.Conv2d, _BatchNorm)) or child is module:
                handles.append(child.register_forward_hook(hook))
    return handles


def enabled_blocks(resnet: nn.Module, switches: Sequence[Sequence[bool]]) -> List[nn.Module]:
    """The blocks of ``resnet`` whose ``switches`` (``sbp_blocks``) are on."""
    return [getattr(resnet, layer)[j] for layer, stage in zip(resnet.res_layers, switches)
            for j, enabled in enumerate(stage) if enabled]


def head_hooks(head: nn.Module, iteration: SBPIteration, image_height: int,
               dense: Sequence[nn.Module] = ()) -> list:
    """Mask the head's unit outputs (convs and conv modules) per level, on the
    levels whose stride the mask covers (the others run densely), except the
    modules of ``dense``."""
    def hook(module, args, output):
        stride = next(s for s in (4, 8, 16, 32, 64, 128)
                      if math.ceil(image_height / s) == output.shape[2])
        if not iteration.covers(stride):
            return output
        return masked(output, row_mask(iteration, stride, output))
    return [m.register_forward_hook(hook) for m in head.modules()
            if (isinstance(m, nn.Conv2d) or type(m).__name__ == 'ConvModule')
            and m not in dense]


def reference_units(dense: nn.Module, sbp_model: nn.Module, iteration: SBPIteration,
                    neck_levels: Iterable[Tuple[int, int]]) -> List[nn.Module]:
    """The backbone blocks and neck conv modules of detector ``dense`` that
    SBP runs as units in ``sbp_model``; ``neck_levels`` are ``(level, stride)``."""
    units = enabled_blocks(dense.backbone, sbp_model.backbone.sbp_blocks)
    for i, stride in neck_levels:
        if iteration.covers(stride):  # the neck's SBP conv groups (sbp.convs)
            units += [getattr(dense.neck, kind)[i] for kind in sbp_model.neck.sbp_conv_groups]
    return units


def assert_grad_close(grad: Tensor, ref: Tensor, name: str) -> None:
    """fp32 gradients summed over many positions: compare relative to their scale."""
    scale = ref.abs().max().item() + 1e-12
    torch.testing.assert_close(grad, ref, atol=1e-4 * scale, rtol=1e-3,
                               msg=lambda m: f'{name}: {m}')


def assert_grads_match(model: nn.Module, reference: nn.Module) -> None:
    """Every parameter gradient of ``model`` equals ``reference``'s (none or zero
    where the reference has none)."""
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            assert p.grad is None or p.grad.abs().sum() == 0, name
        else:
            assert_grad_close(p.grad, q.grad, name)


def total_loss(model: nn.Module, data: dict, seed: int = 1) -> Tensor:
    """The detector's summed losses on ``data``, the samplers seeded by ``seed``."""
    torch.manual_seed(seed)  # the RPN/RoI samplers draw from the global generator
    losses = model(**data, mode='loss')
    return sum(v.sum() if torch.is_tensor(v) else sum(x.sum() for x in v)
               for k, v in losses.items() if 'loss' in k)


def assert_matches_reference(sbp_model: nn.Module, dense: nn.Module, data: dict, loss: Tensor,
                             bitwise: bool = False) -> None:
    """``dense``, hooked to mask like the reference, gives ``loss`` (bit for bit
    with ``bitwise``) and the SBP model's parameter gradients."""
    ref_loss = total_loss(dense, data)
    if bitwise:
        assert torch.equal(loss, ref_loss)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    assert_grads_match(sbp_model, dense)


# ---------------------------------------------------------------- mixed precision

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def autocast(dtype: Union[torch.dtype, None]):
    """CPU autocast to ``dtype``; off for None."""
    return torch.autocast('cpu', dtype=dtype, enabled=dtype is not None)


def assert_amp_close(grad: Tensor, ref: Tensor, ref_fp32: Tensor, dtype: torch.dtype,
                     name: str) -> None:
    """SBP under autocast is as close to the reference under autocast as
    autocast is to fp32, up to one rounding (test_sbp_amp.py's docstring)."""
    error = (grad.float() - ref.float()).norm()
    budget = 2 * (ref.float() - ref_fp32.float()).norm() + UNIT_ROUNDOFF[dtype] * ref.norm()
    assert error <= budget, f'{name}: |sbp - ref| = {error:.3g} > {budget:.3g}'


def run_three_ways(build: Callable[[], nn.Module], program_of: Callable[[nn.Module], SBPProgram],
                   x_shape: Sequence[int], stride: int, mask: Sequence[bool],
                   dtype: torch.dtype, recompute: Union[bool, str] = False,
                   exact_input_grad: bool = False) -> tuple:
    """SBP under autocast, the reference under autocast and the reference in fp32,
    from equal weights and inputs, with one random output gradient.

    Returns ``(modules, inputs, outs)``, dicts keyed ``'sbp'``, ``'ref'``, ``'fp32'``.
    """
    torch.manual_seed(0)
    modules = {name: build() for name in ('sbp', 'ref', 'fp32')}
    for m in modules.values():
        m.load_state_dict(modules['sbp'].state_dict())
    x = torch.randn(*x_shape)
    inputs = {name: x.clone().requires_grad_() for name in modules}
    it = iteration(mask)
    outs = {}
    with autocast(dtype):
        outs['sbp'] = program_of(modules['sbp'])(inputs['sbp'], it, stride, recompute=recompute,
                                                 exact_input_grad=exact_input_grad)
        outs['ref'] = reference_program(program_of(modules['ref']), inputs['ref'], it, stride,
                                        exact_input_grad)
    outs['fp32'] = reference_program(program_of(modules['fp32']), inputs['fp32'], it, stride,
                                     exact_input_grad)
    grad = torch.randn(outs['fp32'].shape)
    for out in outs.values():
        (out.float() * grad).sum().backward()
    return modules, inputs, outs


def assert_dense_without_training(model: nn.Module, dense: nn.Module, x: Tensor) -> None:
    """Under ``torch.no_grad()`` and in eval mode an SBP backbone is its dense class: plain
    feature tuples, bitwise the dense outputs (the same random draws)."""
    with torch.no_grad():
        torch.manual_seed(0)
        outs = model(x)
        assert not isinstance(outs, SBPFeatures)
        torch.manual_seed(0)
        assert all(torch.equal(o, r) for o, r in zip(outs, dense(x)))
    model.eval()
    dense.eval()
    outs = model(x)
    assert not isinstance(outs, SBPFeatures)
    assert all(torch.equal(o, r) for o, r in zip(outs, dense(x)))
