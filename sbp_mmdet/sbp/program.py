"""SBP units and the autograd function that runs a program of them.

An SBP *unit* is one layer: a row-mixing op (a convolution, or none) followed
by a tail of row-local ops (norms, activations, 1x1 convs, residual adds,
layer scale, DropPath; see ``ops.py``). A unit behaves exactly like

    y = where(keep, unit(x), unit(x).detach())

with ``keep`` the kept rows at the unit's output stride, and every op inside
the unit masked the same way: the forward value is the dense value and
gradients flow back only through kept rows. A *program* is the list of units
of one residual block, or a single layer of a neck or head.

What is saved for backward, per unit, is the row-mixing op's output ``z``
(e.g. the pre-norm conv output) at the rows that backward reads: the kept rows,
plus the halo rows that a k x k consumer needs around its kept outputs. The
tail is re-run from ``z`` in backward: without autograd where only its value
is needed (a consumer's input), under autograd on the kept rows for its
gradients. The program input is saved at the rows its consumers read, through
``SBPIteration.pack`` so that a map read by several SBP layers is stored once.
With ``recompute=True`` only the units that feed a k x k convolution keep their
``z``; the others are recomputed in backward on the kept rows (SBP combined
with checkpointing on the kept region). With ``recompute='all'`` no unit keeps
its ``z``: the program input is saved at every row that recomputing the units
reads (their halos widen it, unit by unit), and backward recomputes each unit
at the rows it needs, in program order. A unit without a row-mixing op stores
nothing: its ``z`` is its source.

With ``exact_input_grad=True`` a program whose units are a convolution
followed by eval-mode BatchNorm, residual adds and ReLUs (in that order, each
optional: ResNet blocks with ``norm_eval=True``, the FPN's convs, the towers of
dense heads) gives every tensor, its input included, the exact gradient of
every row, computed from the weights, the norms' fixed scales and the ReLUs'
signs, while the parameters' gradients come from the kept rows: each unit
behaves like

    y = where(keep, unit(x; params), unit(x; params.detach()))

It stores what SBP stores plus one bit per element of each ReLU output (its
sign), and cuts no gradient path; backward computes the input gradients of
every row.

Mixed precision: under ``torch.autocast`` a program runs the way autocast runs
the dense layers. Convolutions compute in the autocast dtype (fp16 on CUDA,
bf16 on the CPU) and what is stored (packed inputs, pre-norm conv outputs) is
in that dtype; BatchNorm statistics are kept in fp32 and its affine math and
backward run in fp32 on the half-precision rows (PyTorch's mixed-type BatchNorm
kernels); the tail is re-run under the forward's autocast state, as
``torch.utils.checkpoint`` does; parameter gradients come back in the
parameters' dtype.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .bitmask import pack_bits, unpack_bits
from .masks import SBPIteration
from .norm import norm_op
from .ops import Add, ConvMix, Mix, TailOp, is_relu, relu
from .rows import Packed, RowSum, gather_rows, union_rows

INPUT = 'input'


@dataclass(frozen=True)
class Unit:
    """One SBP layer: ``tail(mix(source))``.

    Args:
        name: name of the unit's output inside its program.
        source: name of the unit's input (``'input'`` or an earlier unit).
        mix: the row-mixing op (``ConvMix``) or ``IdentityMix()``.
        tail: the row-local ops that follow, in order.
    """

    name: str
    source: str
    mix: Mix
    tail: Tuple[TailOp, ...] = ()

    def parameters(self) -> List[Optional[Tensor]]:
        return self.mix.parameters() + [p for op in self.tail for p in op.parameters()]

    def with_tail(self, *ops: TailOp) -> 'Unit':
        """This unit with ``ops`` appended to its tail."""
        return Unit(self.name, self.source, self.mix, self.tail + tuple(ops))

    def exact_tail(self) -> Tuple[Tuple[TailOp, ...], Tuple[TailOp, ...], bool]:
        """The tail as (norms, adds, ends with a ReLU) for ``exact_input_grad``
        (``check_exact_input_grad`` says whether that split covers it)."""
        ops = list(self.tail)
        relu_end = bool(ops) and is_relu(ops[-1])
        while ops and is_relu(ops[-1]):
            ops.pop()
        first_add = next((i for i, op in enumerate(ops) if isinstance(op, Add)), len(ops))
        return tuple(ops[:first_add]), tuple(ops[first_add:]), relu_end

    def split_tail(self) -> Tuple[Tuple[TailOp, ...], Tuple[Add, ...]]:
        """The tail as (ops re-run under autograd, trailing adds).

        Trailing adds pass their gradient through unchanged, so backward
        needs neither their operands' values nor a re-run for them.
        """
        end = len(self.tail)
        while end and isinstance(self.tail[end - 1], Add):
            end -= 1
        return self.tail[:end], self.tail[end:]


def conv_unit(name: str, source: str, conv: nn.Conv2d, norm: Optional[nn.Module] = None,
              relu_after: bool = False, residual: Optional[str] = None,
              where: Optional[str] = None) -> Unit:
    """``relu(bn(conv(source)) + residual)``, the unit of ResNet and FPN.

    Raises:
        TypeError: for a conv or norm SBP cannot run, naming ``where``.
    """
    where = where or name
    tail: List[TailOp] = [] if norm is None else [norm_op(norm, where)]
    tail += [] if residual is None else [Add(residual)]
    tail += [relu()] if relu_after else []
    return Unit(name, source, ConvMix(conv, where), tuple(tail))


class SBPProgram:
    """An ordered list of units with one input (``'input'``).

    Args:
        units: the units, each after those it reads.
        outputs: names of the units whose values the program returns (a
            tuple when more than one, e.g. a head's classification and
            regression branches). Default: the last unit.
        where: the layer's name, for errors. Default: the first unit's.
    """

    def __init__(self, units: Sequence[Unit], outputs: Optional[Sequence[str]] = None,
                 where: Optional[str] = None) -> None:
        known = {INPUT}
        for unit in units:
            for name in [unit.source] + [op.reads for op in unit.tail if op.reads is not None]:
                if name not in known:
                    raise ValueError(f'unit {unit.name!r} reads {name!r} before it is computed')
            known.add(unit.name)
        self.units = list(units)
        self.where = where or self.units[0].name
        self.outputs = tuple(outputs or [self.units[-1].name])
        unknown = [name for name in self.outputs if name not in known or name == INPUT]
        if unknown:
            raise ValueError(f'program outputs {unknown} are not units of the program')

    def parameters(self) -> List[Optional[Tensor]]:
        return [p for unit in self.units for p in unit.parameters()]

    @property
    def stride(self) -> int:
        """The largest stride of a unit output, relative to the input."""
        strides = {INPUT: 1}
        for unit in self.units:
            strides[unit.name] = strides[unit.source] * unit.mix.geometry.stride
        return max(strides.values())

    def split_outputs(self) -> Tuple['SBPProgram', Tuple[Unit, ...]]:
        """This program without its output units, and those units, to run densely.

        The returned program outputs the output units' sources (each once, in
        order of first use). A caller runs it with SBP and each output unit
        densely on its source's value (``unit.mix.forward``), so that the
        output layers' weights learn from every row, as the paper's dense last
        blocks do (a head's ``sbp.dense_outputs``).

        Raises:
            ValueError: if an output unit has a tail, is read by another unit,
                or reads the program input directly, naming the program.
        """
        units = {unit.name: unit for unit in self.units}
        output_units = tuple(units[name] for name in self.outputs)
        trunk = [unit for unit in self.units if unit.name not in self.outputs]
        read = {name for unit in trunk
                for name in [unit.source] + [op.reads for op in unit.tail if op.reads]}
        for unit in output_units:
            if unit.tail or unit.name in read or unit.source == INPUT:
                raise ValueError(
                    f'{self.where}: dense outputs need output units that are a single '
                    f'layer on an SBP unit and read by no other unit; {unit.name!r} is not')
        sources = tuple(dict.fromkeys(unit.source for unit in output_units))
        return SBPProgram(trunk, outputs=sources, where=self.where), output_units

    def check_exact_input_grad(self, where: Optional[str] = None, modes: bool = True) -> None:
        """Raise unless the program can give its input the exact gradient.

        Args:
            where: the layer's name in errors. Default: the program's.
            modes: check the ops' current modes too (BatchNorm in eval mode);
                False checks the structure only (at build time, before
                ``norm_eval`` sets the mode).

        Raises:
            TypeError: unless every unit is a convolution followed by eval-mode
                BatchNorm, residual adds and ReLUs (in that order, each
                optional), naming ``where`` and the unit.
        """
        where = where or self.where
        for unit in self.units:
            norms, adds, _ = unit.exact_tail()
            if not hasattr(unit.mix, 'input_grad') or not all(
                    op.gives_input_grad for op in norms) or not all(
                    isinstance(op, Add) for op in adds):
                raise TypeError(
                    f'{where}: exact input gradients need convolutions followed by eval-mode '
                    f'BatchNorm, residual adds and ReLUs; unit {unit.name!r} is '
                    f'{type(unit.mix).__name__} + {[type(op).__name__ for op in unit.tail]}')
            for op in norms if modes else ():
                op.check_input_grad()

    def check_modes(self, exact_input_grad: bool = False) -> None:
        """Raise what the ops cannot run in their current modes (e.g. SyncBN in
        train mode; with ``exact_input_grad``, BatchNorm in train mode)."""
        for unit in self.units:
            for op in unit.tail:
                op.check_call()
        if exact_input_grad:
            self.check_exact_input_grad()

    def __call__(self, x: Tensor, iteration: SBPIteration, stride: int,
                 recompute: Union[bool, str] = False, grad_scale: str = 'none',
                 exact_input_grad: bool = False) -> Union[Tensor, Tuple[Tensor, ...]]:
        """Run the program with SBP on ``x`` (a map at ``stride``); ``recompute``:
        ``False``, ``True`` or ``'all'`` (see the module docstring).

        Its ops' modes are checked by ``check_modes``, once per ``.train()``
        of the SBP module that runs it, not here.
        """
        run = _Run(self, iteration, stride, recompute, grad_scale, compute_dtype(x),
                   exact_input_grad)
        outs = _SBPFunction.apply(run, x, *self.parameters())
        return outs[0] if len(self.outputs) == 1 else outs


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a convolution on ``x`` computes in: autocast's when it is on."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Run:
    """One call of a program: plans rows, stores what backward needs."""

    def __init__(self, program: SBPProgram, iteration: SBPIteration, stride: int,
                 recompute: Union[bool, str], grad_scale: str, dtype: torch.dtype,
                 exact_input_grad: bool = False) -> None:
        self.program = program
        self.units = {unit.name: unit for unit in program.units}
        self.iteration = iteration
        self.in_stride = stride
        self.recompute = recompute
        self.grad_scale = grad_scale
        self.dtype = dtype
        self.exact_input_grad = exact_input_grad
        # (norms, adds, ends with a ReLU) per unit, read in forward and backward
        self.exact_tails = {unit.name: unit.exact_tail() for unit in program.units} \
            if exact_input_grad else {}

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        values: Dict[str, Tensor] = {INPUT: x}
        self.shapes = {INPUT: x.shape}
        self.strides = {INPUT: self.in_stride}
        self.states: Dict[str, list] = {}
        mixed: Dict[str, Tensor] = {}
        for unit in self.program.units:
            z = out = unit.mix.forward(values[unit.source])
            states = []
            for op in unit.tail:
                out, state = op.forward(out, None if op.reads is None else values[op.reads])
                states.append(state)
            values[unit.name], mixed[unit.name] = out, z
            self.states[unit.name] = states
            self.shapes[unit.name] = out.shape
            self.strides[unit.name] = self.strides[unit.source] * unit.mix.geometry.stride
        self.heights = {name: shape[2] for name, shape in self.shapes.items()}
        self.input_dtype = x.dtype
        self.needs_input_grad = x.requires_grad
        self.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                         torch.get_autocast_dtype(x.device.type))
        self._plan()
        packed_input, self.input_rows = self.iteration.pack(x, self.input_rows, self.dtype)
        self.to_save = [packed_input] + [
            gather_rows(mixed[name], rows) for name, rows in self.stored_rows.items()]
        self.relu_signs = [name for name, (_, _, relu_end) in self.exact_tails.items()
                           if relu_end]
        self.to_save += [pack_bits(values[name] > 0) for name in self.relu_signs]
        return tuple(values[name] for name in self.program.outputs)

    def restore(self, tensors: Sequence[Tensor]) -> None:
        """Take back the tensors that autograd kept for backward."""
        self.saved_input = Packed(tensors[0], self.input_rows, self.heights[INPUT])
        stored = len(self.stored_rows)
        self.saved = {name: Packed(data, rows, self.heights[name]) for (name, rows), data in
                      zip(self.stored_rows.items(), tensors[1:1 + stored])}
        self.saved_signs = dict(zip(self.relu_signs, tensors[1 + stored:]))

    def _plan(self) -> None:
        """Decide, per tensor, which rows backward reads."""
        units = self.program.units
        self.kept = {name: self.iteration.kept_rows(self.strides[name], self.heights[name])
                     for name in self.heights}
        # the units whose z is stored (where backward reads it) rather than recomputed
        if self.recompute == 'all':
            stores_z = set()
        elif self.recompute:  # those feeding a k x k conv
            stores_z = {u.source for u in units if u.mix.geometry.kernel > 1}
        else:
            stores_z = {u.name for u in units}
        value_rows: Dict[str, List[Tensor]] = {name: [] for name in self.heights}
        for unit in units:
            value_rows[unit.source].append(
                unit.mix.backward_reads(self.kept[unit.name], self.heights[unit.source]))
            rerun, _ = unit.split_tail()
            for op in rerun:
                if op.reads is not None:
                    value_rows[op.reads].append(self.kept[unit.name])
        self.mixed_rows: Dict[str, Tensor] = {}
        self.stored_rows: Dict[str, Tensor] = {}
        for unit in reversed(units):
            wanted = value_rows[unit.name]
            if unit.split_tail()[0]:
                wanted = wanted + [self.kept[unit.name]]
            if not wanted:  # a plain conv read by nobody: backward needs only its input
                continue
            rows = _union(wanted[1:], wanted[0], self.heights[unit.name])
            self.mixed_rows[unit.name] = rows
            for op in unit.tail:
                if op.reads is not None:
                    value_rows[op.reads].append(rows)
            if not unit.mix.stores or unit.name not in stores_z:
                value_rows[unit.source].append(unit.mix.reads(rows, self.heights[unit.source]))
            else:
                self.stored_rows[unit.name] = rows
        self.input_rows = _union(value_rows[INPUT], self.kept[INPUT], self.heights[INPUT])

    # --------------------------------------------------------------- backward
    def backward(self, grad_outputs: Sequence[Tensor]
                 ) -> Tuple[Optional[Tensor], List[Optional[Tensor]]]:
        mixed = self._restore_mixed()
        if self.exact_input_grad:
            grad_input, param_grads = self._exact_input_backward(mixed, grad_outputs)
        else:
            grad_input, param_grads = self._kept_rows_backward(mixed, grad_outputs)
        param_grads = [None if g is None else g.to(p.dtype)
                       for g, p in zip(param_grads, self.program.parameters())]
        return None if grad_input is None else grad_input.to(self.input_dtype), param_grads

    def _restore_mixed(self) -> Dict[str, Packed]:
        """The stored row-mixing outputs, plus those recomputed in program order."""
        mixed = dict(self.saved)
        for unit in self.program.units:
            if unit.name not in mixed and unit.name in self.mixed_rows:
                rows = self.mixed_rows[unit.name]
                source = self._value(unit.source, mixed,
                                     unit.mix.reads(rows, self.heights[unit.source]))
                mixed[unit.name] = Packed(unit.mix.rows(source, rows), rows,
                                          self.heights[unit.name])
        return mixed

    def _kept_rows_backward(self, mixed: Dict[str, Packed], grad_outputs: Sequence[Tensor]
                            ) -> Tuple[Optional[Tensor], List[Optional[Tensor]]]:
        """SBP's backward: gradients flow through the kept rows only."""
        grads: Dict[str, Tensor] = {}
        for name, grad in zip(self.program.outputs, grad_outputs):
            self._accumulate(name, self.kept[name], gather_rows(grad, self.kept[name]), grads,
                             None)
        grad_input = RowSum(self.shapes[INPUT], self.dtype) if self.needs_input_grad else None
        param_grads: List[Optional[Tensor]] = []
        for unit in reversed(self.program.units):
            param_grads[:0] = self._unit_backward(unit, mixed, grads, grad_input)
        return None if grad_input is None else grad_input.full(grad_outputs[0]), param_grads

    def _exact_input_backward(self, mixed: Dict[str, Packed], grad_outputs: Sequence[Tensor]
                              ) -> Tuple[Optional[Tensor], List[Optional[Tensor]]]:
        """Every row's gradient flows to the input; parameters learn on the kept rows."""
        grads = {name: grad.to(self.dtype) for name, grad in zip(self.program.outputs,
                                                                 grad_outputs)}
        param_grads: List[Optional[Tensor]] = []
        for unit in reversed(self.program.units):
            grad, kept = grads.pop(unit.name, None), self.kept[unit.name]
            if grad is not None and unit.name in self.saved_signs:  # through the ReLU
                positive = unpack_bits(self.saved_signs[unit.name], self.shapes[unit.name])
                grad = torch.where(positive, grad, grad.new_zeros(()))
            if grad is None:
                param_grads[:0] = [None] * len(unit.parameters())
                continue
            norms, adds, _ = self.exact_tails[unit.name]
            for op in adds:
                _add_to(grads, op.reads, grad)
            states = self.states[unit.name][:len(norms)]
            unit_grads: List[Optional[Tensor]] = [None] * len(unit.parameters())
            if kept.shape[-1]:
                kept_grad, norm_grads = self._tail_backward(
                    unit, norms, mixed, kept, gather_rows(grad, kept), {}, None)
                source = self._value(unit.source, mixed, unit.mix.backward_reads(
                    kept, self.heights[unit.source]))
                _, mix_grads = unit.mix.backward(source, kept, kept_grad, False)
                unit_grads = self._scaled(unit, kept, mix_grads + norm_grads)
            param_grads[:0] = unit_grads
            for op, state in zip(reversed(norms), reversed(states)):
                grad = op.input_grad(grad, state)
            if unit.source != INPUT or self.needs_input_grad:
                _add_to(grads, unit.source, unit.mix.input_grad(grad, self.shapes[unit.source]))
        grad_input = grads.pop(INPUT, None)
        if grad_input is None and self.needs_input_grad:
            grad_input = grad_outputs[0].new_zeros(self.shapes[INPUT], dtype=self.dtype)
        return grad_input, param_grads

    def _autocast(self) -> torch.autocast:
        """The forward pass's autocast state, for re-running tails."""
        device, enabled, dtype = self.autocast
        return torch.autocast(device, dtype=dtype, enabled=enabled)

    def _value(self, name: str, mixed: Dict[str, Packed], rows: Tensor) -> Packed:
        """The value of tensor ``name`` at ``rows``, recomputed from stored rows."""
        if name == INPUT:
            return Packed(self.saved_input.take(rows), rows, self.heights[INPUT])
        unit = self.units[name]
        out = mixed[name].take(rows)
        with self._autocast():
            for op, state in zip(unit.tail, self.states[name]):
                other = None if op.reads is None else self._value(op.reads, mixed, rows).data
                out = op.rows(out, other, state)
        return Packed(out, rows, self.heights[name])

    def _unit_backward(self, unit: Unit, mixed: Dict[str, Packed], grads: Dict[str, Tensor],
                       grad_input: Optional[RowSum]) -> list:
        kept = self.kept[unit.name]
        grad = grads.pop(unit.name, None)
        if grad is None or kept.shape[-1] == 0:
            return [None] * len(unit.parameters())
        rerun, trailing = unit.split_tail()
        for op in trailing:
            self._accumulate(op.reads, kept, grad, grads, grad_input)
        grad, tail_grads = self._tail_backward(unit, rerun, mixed, kept, grad, grads, grad_input)
        need_input = unit.source != INPUT or grad_input is not None
        source = None
        if unit.mix.stores:
            source = self._value(unit.source, mixed,
                                 unit.mix.backward_reads(kept, self.heights[unit.source]))
        # a unit source keeps the gradient at its kept rows only: the output's, at equal strides
        kept_input = unit.source != INPUT and self.strides[unit.source] == self.strides[
            unit.name] and self.heights[unit.source] == self.heights[unit.name]
        grad_src, mix_grads = unit.mix.backward(source, kept, grad, need_input, kept_input)
        if grad_src is not None:
            self._accumulate(unit.source, grad_src.rows, grad_src.data, grads, grad_input)
        return self._scaled(unit, kept, mix_grads + tail_grads)  # adds have no parameters

    def _scaled(self, unit: Unit, kept: Tensor,
                param_grads: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """``param_grads`` of ``unit`` with ``grad_scale`` applied."""
        if self.grad_scale == 'inverse_keep':
            scale = self.heights[unit.name] / kept.shape[-1]
            return [None if g is None else g * scale for g in param_grads]
        return param_grads

    def _tail_backward(self, unit: Unit, rerun: Sequence[TailOp], mixed: Dict[str, Packed],
                       kept: Tensor, grad: Tensor, grads: Dict[str, Tensor],
                       grad_input: Optional[RowSum]) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """Gradients through the re-run tail (autograd on the kept rows).

        Returns the gradient of ``z`` at the kept rows and the tail ops'
        parameter gradients; operands of adds get theirs accumulated.
        """
        if not rerun:
            return grad, []
        z = mixed[unit.name].take(kept).detach().requires_grad_()
        others = {op.reads: self._value(op.reads, mixed, kept).data.detach().requires_grad_()
                  for op in rerun if op.reads is not None}
        params = [p for op in rerun for p in op.parameters()]
        trainable = [p for p in params if p is not None and p.requires_grad]
        with torch.enable_grad(), self._autocast():
            out = z
            for op, state in zip(rerun, self.states[unit.name]):
                out = op.rows(out, others.get(op.reads), state)
        found = torch.autograd.grad(out, [z, *others.values(), *trainable], grad.to(out.dtype),
                                    allow_unused=True)
        for name, g in zip(others, found[1:1 + len(others)]):
            if g is not None:
                self._accumulate(name, kept, g, grads, grad_input)
        by_param = dict(zip(map(id, trainable), found[1 + len(others):]))
        return found[0], [None if p is None else by_param.get(id(p)) for p in params]

    def _accumulate(self, name: str, rows: Tensor, grad: Tensor, grads: Dict[str, Tensor],
                    grad_input: Optional[RowSum]) -> None:
        """Add ``grad`` (at ``rows``) to the gradient of ``name``.

        The program input keeps every row it receives (a dense layer before
        it gets its exact gradient); a unit keeps its kept rows only.
        """
        if name == INPUT:
            if grad_input is not None:
                grad_input.add(rows, grad)
            return
        grad = Packed(grad, rows, self.heights[name]).take(self.kept[name]).to(self.dtype)
        grads[name] = grad if name not in grads else grads[name] + grad


def _add_to(grads: Dict[str, Tensor], name: str, grad: Tensor) -> None:
    """Accumulate the gradient of every row of ``name``."""
    grads[name] = grad + grads[name] if name in grads else grad


def _union(parts: List[Tensor], base: Tensor, height: int) -> Tensor:
    """Sorted union of ``base`` and ``parts`` (per image for ``(N, R)`` rows);
    ``base`` itself when they add nothing."""
    if not parts:
        return base
    union = union_rows([base] + parts, height)
    return base if union.shape == base.shape else union


class _SBPFunction(torch.autograd.Function):
    """Dense forward, backward on kept rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, run: _Run, x: Tensor, *params: Optional[Tensor]) -> Tuple[Tensor, ...]:
        ctx.run = run
        outs = run.forward(x)
        ctx.save_for_backward(*run.to_save)
        del run.to_save
        return outs

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        run = ctx.run
        del ctx.run
        run.restore(ctx.saved_tensors)
        grad_input, param_grads = run.backward([g.contiguous() for g in grad_outputs])
        return (None, grad_input, *param_grads)
