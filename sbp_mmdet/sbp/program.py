"""SBP units and the autograd function that runs a block of them.

An SBP *unit* is one layer: a convolution with the BatchNorm, residual add and
ReLU that follow it. A unit behaves exactly like

    y = where(keep, unit(x), unit(x).detach())

with ``keep`` the kept rows at the unit's output stride: the forward value is
the dense value and gradients flow back only through kept rows (inside the
unit too: its conv output is masked the same way, see ``norm.py``). A
*program* is the list of units of one residual block, or a single layer of a
neck.

What is saved for backward, per unit, is the conv output ``z`` (pre-norm) at
the rows that backward reads: the kept rows, plus the halo rows that a k x k
consumer needs around its kept outputs. Activations after norm and ReLU are
recomputed from ``z`` elementwise. The block input is saved at the rows its
consumers read, through ``SBPIteration.pack`` so that a map read by several
SBP layers is stored once. With ``recompute=True`` only the units that feed a
k x k convolution keep their ``z``; the others are recomputed in backward on
the kept rows (SBP combined with checkpointing on the kept region).

Mixed precision: under ``torch.autocast`` a program runs the way autocast runs
the dense layers. Convolutions compute in the autocast dtype (fp16 on CUDA,
bf16 on the CPU) and what is stored (packed inputs, pre-norm conv outputs) is
in that dtype; BatchNorm statistics are kept in fp32 and its affine math and
backward run in fp32 on the half-precision rows (PyTorch's mixed-type BatchNorm
kernels); parameter gradients come back in the parameters' dtype. The
backward pass uses the dtype of its forward, whatever autocast state it runs
in.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .masks import SBPIteration
from .norm import NormStats, norm_backward, norm_forward
from .rows import Packed, RowGeometry, add_rows_, conv_rows, conv_rows_backward, gather_rows

INPUT = 'input'


@dataclass(frozen=True)
class ConvUnit:
    """One SBP layer: ``relu(norm(conv(source)) + residual)``.

    Args:
        name: name of the unit's output inside its program.
        source: name of the conv input (``'input'`` or an earlier unit).
        conv: a plain ``nn.Conv2d``.
        norm: a BatchNorm layer, or None.
        relu: whether a ReLU follows.
        residual: name of a tensor added after the norm, before the ReLU.
    """

    name: str
    source: str
    conv: nn.Conv2d
    norm: Optional[_BatchNorm] = None
    relu: bool = False
    residual: Optional[str] = None

    def parameters(self) -> List[Optional[Tensor]]:
        norm = self.norm
        return [self.conv.weight, self.conv.bias,
                None if norm is None else norm.weight, None if norm is None else norm.bias]


def check_unit_layers(conv: nn.Module, norm: Optional[nn.Module], where: str) -> None:
    """Raise a clear error for layers SBP cannot run."""
    if type(conv) is not nn.Conv2d:
        raise TypeError(f'{where}: SBP supports plain nn.Conv2d layers (conv_cfg=None), '
                        f'got {type(conv).__name__}; use the dense module for it')
    if isinstance(conv.padding, str) or conv.padding_mode != 'zeros':
        raise TypeError(f'{where}: SBP supports numeric zero padding only')
    if norm is not None and not isinstance(norm, _BatchNorm):
        raise TypeError(f'{where}: SBP supports BatchNorm (BN/SyncBN in eval) normalisation, '
                        f'got {type(norm).__name__}; use the dense module or a BN norm_cfg')


class SBPProgram:
    """An ordered list of units with one input (``'input'``) and one output."""

    def __init__(self, units: Sequence[ConvUnit]) -> None:
        known = {INPUT}
        for unit in units:
            for name in (unit.source, unit.residual):
                if name is not None and name not in known:
                    raise ValueError(f'unit {unit.name!r} reads {name!r} before it is computed')
            known.add(unit.name)
        self.units = list(units)
        self.output = self.units[-1].name

    def parameters(self) -> List[Optional[Tensor]]:
        return [p for unit in self.units for p in unit.parameters()]

    def __call__(self, x: Tensor, iteration: SBPIteration, stride: int,
                 recompute: bool = False, grad_scale: str = 'none') -> Tensor:
        """Run the program with SBP on ``x`` (a map at ``stride``)."""
        for unit in self.units:
            if isinstance(unit.norm, nn.SyncBatchNorm) and unit.norm.training:
                raise NotImplementedError(
                    f'SBP unit {unit.name!r}: SyncBN in train mode is not supported (its '
                    'statistics gradient needs a cross-rank reduction); use BN, or '
                    'norm_eval=True as the standard COCO configs do')
        run = _Run(self, iteration, stride, recompute, grad_scale, compute_dtype(x))
        return _SBPFunction.apply(run, x, *self.parameters())


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a convolution on ``x`` computes in: autocast's when it is on."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Run:
    """One call of a program: plans rows, stores what backward needs."""

    def __init__(self, program: SBPProgram, iteration: SBPIteration, stride: int,
                 recompute: bool, grad_scale: str, dtype: torch.dtype) -> None:
        self.program = program
        self.iteration = iteration
        self.in_stride = stride
        self.recompute = recompute
        self.grad_scale = grad_scale
        self.dtype = dtype

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        units = self.program.units
        values: Dict[str, Tensor] = {INPUT: x}
        self.heights = {INPUT: x.shape[2]}
        self.strides = {INPUT: self.in_stride}
        self.stats: Dict[str, NormStats] = {}
        convs: Dict[str, Tensor] = {}
        for unit in units:
            z = unit.conv(values[unit.source])
            out = z
            if unit.norm is not None:
                self.stats[unit.name] = NormStats.capture(unit.norm, z)
                out = unit.norm(z)
            if unit.residual is not None:
                out = out + values[unit.residual]
            if unit.relu:
                out = F.relu(out)
            values[unit.name] = out
            convs[unit.name] = z
            self.heights[unit.name] = out.shape[2]
            self.strides[unit.name] = self.strides[unit.source] * unit.conv.stride[0]
        self.shape = x.shape
        self.input_dtype = x.dtype
        self.needs_input_grad = x.requires_grad
        self._plan()
        packed_input, self.input_rows = self.iteration.pack(x, self.input_rows, self.dtype)
        self.to_save = [packed_input] + [
            gather_rows(convs[name], rows) for name, rows in self.stored_rows.items()]
        return values[self.program.output]

    def restore(self, tensors: Sequence[Tensor]) -> None:
        """Take back the tensors that autograd kept for backward."""
        self.saved_input = Packed(tensors[0], self.input_rows, self.heights[INPUT])
        self.saved = {name: Packed(data, rows, self.heights[name]) for (name, rows), data in
                      zip(self.stored_rows.items(), tensors[1:])}

    def _plan(self) -> None:
        """Decide, per tensor, which rows backward reads."""
        units = self.program.units
        self.kept = {name: self.iteration.kept_rows(self.strides[name], self.heights[name])
                     for name in self.heights}
        halo_fed = {u.source for u in units if u.conv.kernel_size[0] > 1}
        value_rows: Dict[str, List[Tensor]] = {name: [] for name in self.heights}
        for unit in units:
            geom = RowGeometry.of(unit.conv)
            value_rows[unit.source].append(
                geom.input_rows(self.kept[unit.name], self.heights[unit.source]))
            if unit.residual is not None and unit.relu:
                value_rows[unit.residual].append(self.kept[unit.name])
        self.conv_rows: Dict[str, Tensor] = {}
        self.stored_rows: Dict[str, Tensor] = {}
        for unit in reversed(units):
            wanted = value_rows[unit.name]
            if unit.norm is not None or unit.relu:
                wanted = wanted + [self.kept[unit.name]]
            if not wanted:  # a plain conv read by nobody: backward needs only its input
                continue
            rows = _union(wanted[1:], wanted[0])
            self.conv_rows[unit.name] = rows
            if unit.residual is not None:
                value_rows[unit.residual].append(rows)
            if self.recompute and unit.name not in halo_fed:
                value_rows[unit.source].append(RowGeometry.of(unit.conv).input_rows(
                    rows, self.heights[unit.source]))
            else:
                self.stored_rows[unit.name] = rows
        self.input_rows = _union(value_rows[INPUT], self.kept[INPUT])

    # --------------------------------------------------------------- backward
    def backward(self, grad_output: Tensor) -> Tuple[Optional[Tensor], List[Optional[Tensor]]]:
        units = self.program.units
        conv_out = dict(self.saved)
        for unit in units:  # recompute what was not stored, in program order
            if unit.name not in conv_out and unit.name in self.conv_rows:
                rows = self.conv_rows[unit.name]
                source = self._value(unit.source, conv_out, self._source_rows(unit))
                conv_out[unit.name] = Packed(conv_rows(unit.conv, source, rows), rows,
                                             self.heights[unit.name])
        grads: Dict[str, Tensor] = {self.program.output: gather_rows(
            grad_output, self.kept[self.program.output]).to(self.dtype)}
        grad_input = grad_output.new_zeros(self.shape, dtype=self.dtype) \
            if self.needs_input_grad else None
        param_grads: List[Optional[Tensor]] = []
        for unit in reversed(units):
            param_grads[:0] = self._unit_backward(unit, conv_out, grads, grad_input)
        param_grads = [None if g is None else g.to(p.dtype)
                       for g, p in zip(param_grads, self.program.parameters())]
        return None if grad_input is None else grad_input.to(self.input_dtype), param_grads

    def _source_rows(self, unit: ConvUnit) -> Tensor:
        return RowGeometry.of(unit.conv).input_rows(self.conv_rows[unit.name],
                                                    self.heights[unit.source])

    def _value(self, name: str, conv_out: Dict[str, Packed], rows: Tensor) -> Packed:
        """The value of tensor ``name`` at ``rows``, recomputed from stored rows."""
        if name == INPUT:
            return Packed(self.saved_input.take(rows), rows, self.heights[INPUT])
        unit = self._unit(name)
        out = conv_out[name].take(rows)
        if unit.norm is not None:
            out = norm_forward(unit.norm, self.stats[name], out)
        if unit.residual is not None:
            out = out + self._value(unit.residual, conv_out, rows).data
        if unit.relu:
            out = F.relu(out)
        return Packed(out, rows, self.heights[name])

    def _unit(self, name: str) -> ConvUnit:
        return next(u for u in self.program.units if u.name == name)

    def _unit_backward(self, unit: ConvUnit, conv_out: Dict[str, Packed],
                       grads: Dict[str, Tensor], grad_input: Optional[Tensor]) -> list:
        kept = self.kept[unit.name]
        grad = grads.pop(unit.name, None)
        if grad is None or len(kept) == 0:
            return [None, None, None, None]
        if unit.relu:
            grad = torch.ops.aten.threshold_backward(
                grad, self._value(unit.name, conv_out, kept).data, 0)
        if unit.residual is not None:
            self._accumulate(unit.residual, kept, grad, grads, grad_input)
        norm_w = norm_b = None
        if unit.norm is not None:
            grad, norm_w, norm_b = norm_backward(unit.norm, self.stats[unit.name],
                                                 conv_out[unit.name].take(kept), grad)
        need_input = unit.source != INPUT or grad_input is not None
        source = self._value(unit.source, conv_out,
                             RowGeometry.of(unit.conv).input_rows(kept, self.heights[unit.source]))
        grad_src, conv_w, conv_b = conv_rows_backward(unit.conv, source, kept, grad, need_input)
        if grad_src is not None:
            self._accumulate(unit.source, grad_src.rows, grad_src.data, grads, grad_input)
        if self.grad_scale == 'inverse_keep':
            scale = self.heights[unit.name] / len(kept)
            return [None if g is None else g * scale for g in (conv_w, conv_b, norm_w, norm_b)]
        return [conv_w, conv_b, norm_w, norm_b]

    def _accumulate(self, name: str, rows: Tensor, grad: Tensor, grads: Dict[str, Tensor],
                    grad_input: Optional[Tensor]) -> None:
        """Add ``grad`` (at ``rows``) to the gradient of ``name``.

        The program input keeps every row it receives (a dense layer before
        it gets its exact gradient); a unit keeps its kept rows only.
        """
        if name == INPUT:
            if grad_input is not None:
                add_rows_(grad_input, rows, grad)
            return
        grad = Packed(grad, rows, self.heights[name]).take(self.kept[name])
        grads[name] = grad if name not in grads else grads[name] + grad


def _union(parts: List[Tensor], base: Tensor) -> Tensor:
    """Sorted union of ``base`` and ``parts``; ``base`` itself when they add nothing."""
    if not parts:
        return base
    union = torch.unique(torch.cat([base] + parts))
    return base if len(union) == len(base) else union


class _SBPFunction(torch.autograd.Function):
    """Dense forward, backward on kept rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, run: _Run, x: Tensor, *params: Optional[Tensor]) -> Tensor:
        ctx.run = run
        out = run.forward(x)
        ctx.save_for_backward(*run.to_save)
        del run.to_save
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        run = ctx.run
        del ctx.run
        run.restore(ctx.saved_tensors)
        grad_input, param_grads = run.backward(grad_output.contiguous())
        return (None, grad_input, *param_grads)
