"""The reference semantics of SBP, written with plain autograd.

Each SBP unit behaves like ``where(keep, unit(x), unit(x).detach())`` with the
output of every op inside it masked the same way (see
``sbp_mmdet/sbp/program.py``). This module builds that reference from the ops'
plain module calls (``reference``), for the tests.
"""
from typing import Callable, Dict, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from sbp_mmdet.sbp import BatchNorm, SBPIteration, SBPProgram
from sbp_mmdet.sbp.program import INPUT


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
