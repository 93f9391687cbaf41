"""The ops an SBP unit is made of.

A unit is one *row-mixing* op followed by a *tail* of row-local ops:

- the row-mixing op (``ConvMix``: any ``nn.Conv2d``, whatever its kernel,
  stride, dilation or groups; ``PoolMix``: any ``nn.AvgPool2d``;
  ``LinearMix``: a channel ``nn.Linear``, stored rather than re-run;
  ``UnfoldMix``: non-overlapping patches, ``nn.Unfold``;
  ``IdentityMix``: none) says which input rows
  its output rows read (its halo, ``reads``) and runs forward and backward on
  packed rows (``rows.py``). Row sets are ``(R,)``, shared by the batch, or
  ``(N, R)`` per image; what ``reads`` and ``backward_reads`` return is of the
  kind they are given (an empty per-image set is ``(N, 0)``);
- a tail op maps row ``i`` of its input to row ``i`` of its output (norms over
  channels, activations, 1x1 convs and channel ``Linear`` layers, residual
  adds, channel slices and concatenations, layer scale, DropPath). In
  backward the tail is re-run on the stored rows under autograd, as
  ``torch.utils.checkpoint`` does, so a tail op only says how it runs
  forward; what autograd cannot see (BatchNorm's statistics over dropped
  rows) is a hand-written autograd function (``norm.py``).

A tail op has three methods: ``forward(x, other)`` runs it on the full map in
the program's forward pass and returns its output and the state its re-run
needs (BatchNorm statistics, the random state of DropPath); ``rows(x, other,
state)`` runs it on packed rows with that state; ``reference(x, other)`` is
the plain module call that defines it (the tests' reference). ``other`` is the
value of the tensor named by ``reads`` (a residual add's second operand).
"""
import copy
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .rows import Packed, RowGeometry, add_rows_, conv_rows, conv_rows_backward, gather_rows

ParamGrads = List[Optional[Tensor]]
# the geometry of ops whose output row i reads input row i only
NO_HALO = RowGeometry(kernel=1, stride=1, padding=0, dilation=1)


class ConvMix:
    """A convolution as the row-mixing op of a unit (stored, banded backward).

    Args:
        conv: a plain ``nn.Conv2d`` with numeric zero padding.
        where: the layer's name, for errors.
    """

    stores = True

    def __init__(self, conv: nn.Conv2d, where: str = 'conv') -> None:
        if type(conv) is not nn.Conv2d:
            raise TypeError(f'{where}: SBP supports plain nn.Conv2d layers (conv_cfg=None), '
                            f'got {type(conv).__name__}; use the dense module for it')
        if isinstance(conv.padding, str) or conv.padding_mode != 'zeros':
            raise TypeError(f'{where}: SBP supports numeric zero padding only')
        self.conv = conv
        self.geometry = RowGeometry.of(conv)

    def parameters(self) -> List[Optional[Tensor]]:
        return [self.conv.weight, self.conv.bias]

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

    reference = forward

    def reads(self, out_rows: Tensor, in_height: int) -> Tensor:
        """Input rows that computing ``out_rows`` reads."""
        return self.geometry.input_rows(out_rows, in_height)

    backward_reads = reads

    def rows(self, src: Packed, out_rows: Tensor) -> Tensor:
        return conv_rows(self.conv, src, out_rows)

    def backward(self, src: Optional[Packed], out_rows: Tensor, grad: Tensor,
                 need_input: bool, kept_input: bool = False
                 ) -> Tuple[Optional[Packed], ParamGrads]:
        """Gradients at ``out_rows``; ``kept_input``: the caller keeps the input
        gradient at ``out_rows`` only (see ``conv_rows_backward``)."""
        grad_in, grad_w, grad_b = conv_rows_backward(self.conv, src, out_rows, grad, need_input,
                                                     kept_input)
        return grad_in, [grad_w, grad_b]

    def input_grad(self, grad: Tensor, in_shape: torch.Size) -> Tensor:
        """The gradient of the whole input from that of every output row.

        It reads the weights only, no stored input: what lets a unit give its
        input the exact gradient while its parameters learn on the kept rows.
        """
        conv = self.conv
        return torch.nn.grad.conv2d_input(in_shape, conv.weight.to(grad.dtype), grad,
                                          conv.stride, conv.padding, conv.dilation, conv.groups)


class PoolMix:
    """An ``nn.AvgPool2d`` as the row-mixing op of a unit (e.g. the
    ``avg_down`` shortcut of ResNetV1d: pool, then a 1x1 conv in the tail).

    Any kernel, stride, padding, ``ceil_mode`` and ``count_include_pad``.
    Average pooling is linear, so its backward reads no input values: only the
    pooled map is stored (at the kept rows the tail re-runs on). In backward,
    and when recomputed, it runs on a zero-filled map of the input's size (a
    transient tensor: pooling has no parameters and is cheap), so every
    border rule of the pool holds as in the dense layer.

    Args:
        pool: a plain ``nn.AvgPool2d``.
        where: the layer's name, for errors.
    """

    stores = True

    def __init__(self, pool: nn.AvgPool2d, where: str = 'pool') -> None:
        if type(pool) is not nn.AvgPool2d:
            raise TypeError(f'{where}: PoolMix supports nn.AvgPool2d, got {type(pool).__name__}')
        self.pool = pool
        self.kernel, self.padding = _pair(pool.kernel_size), _pair(pool.padding)
        self.stride = _pair(pool.stride or pool.kernel_size)
        self.geometry = RowGeometry(self.kernel[0], self.stride[0], self.padding[0], 1)

    def parameters(self) -> List[Optional[Tensor]]:
        return []

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x)

    reference = forward

    def reads(self, out_rows: Tensor, in_height: int) -> Tensor:
        return self.geometry.input_rows(out_rows, in_height)

    def backward_reads(self, out_rows: Tensor, in_height: int) -> Tensor:
        return out_rows[..., :0]  # linear: the gradient needs no input values

    def rows(self, src: Packed, out_rows: Tensor) -> Tensor:
        return gather_rows(self.pool(src.take(torch.arange(src.height))), out_rows)

    def backward(self, src: Packed, out_rows: Tensor, grad: Tensor,
                 need_input: bool, kept_input: bool = False
                 ) -> Tuple[Optional[Packed], ParamGrads]:
        if not need_input:
            return None, []
        n, c, _, width = src.data.shape
        out_height = _pool_size(src.height, self.kernel[0], self.stride[0], self.padding[0],
                                self.pool.ceil_mode)
        full = add_rows_(grad.new_zeros(n, c, out_height, grad.shape[3]), out_rows, grad)
        grad_in = torch.ops.aten.avg_pool2d_backward(
            full, grad.new_empty(n, c, src.height, width), list(self.kernel), list(self.stride),
            list(self.padding), self.pool.ceil_mode, self.pool.count_include_pad,
            self.pool.divisor_override)
        in_rows = self.reads(out_rows, src.height)
        return Packed(gather_rows(grad_in, in_rows), in_rows, src.height), []


def _pool_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output size of a pooling layer along one axis (PyTorch's rule)."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the map or its left padding
    return out


# subclasses of nn.Linear that compute F.linear unchanged (named, not imported: the engine
# imports nothing from mmcv)
_LINEAR_WRAPPERS = ('mmcv.cnn.bricks.wrappers.Linear',)


def _qualname(cls: type) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


class LinearMix:
    """A channel ``nn.Linear`` on an ``(N, C, H, W)`` map as the leading op of a
    unit (ConvNeXt's pointwise layers with ``linear_pw_conv=True``).

    It reads no other rows (like a 1x1 conv), so it needs no halo. As a
    unit's leading op its output is stored at the rows backward reads, and
    backward runs the matrix products by hand on those rows: a ``Linear`` in a
    tail would be re-run in backward instead. It runs on the channels-last
    view, as ConvNeXt's block does, so that values and memory layout are the
    block's.

    Args:
        linear: a plain ``nn.Linear``, or mmcv's ``Linear`` (the same layer,
            which also accepts empty inputs: mmcv's FFN, mmdet's Swin).
        where: the layer's name, for errors.
    """

    stores = True
    geometry = NO_HALO

    def __init__(self, linear: nn.Linear, where: str = 'linear') -> None:
        if type(linear) is not nn.Linear and _qualname(type(linear)) not in _LINEAR_WRAPPERS:
            raise TypeError(f'{where}: LinearMix supports nn.Linear, got {type(linear).__name__}')
        self.linear = linear

    def parameters(self) -> List[Optional[Tensor]]:
        return [self.linear.weight, self.linear.bias]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    reference = forward

    def reads(self, out_rows: Tensor, in_height: int) -> Tensor:
        return out_rows

    backward_reads = reads

    def rows(self, src: Packed, out_rows: Tensor) -> Tensor:
        x = src.take(out_rows)
        bias = None if self.linear.bias is None else self.linear.bias.to(x.dtype)
        return F.linear(x.permute(0, 2, 3, 1), self.linear.weight.to(x.dtype),
                        bias).permute(0, 3, 1, 2)

    def backward(self, src: Packed, out_rows: Tensor, grad: Tensor,
                 need_input: bool, kept_input: bool = False
                 ) -> Tuple[Optional[Packed], ParamGrads]:
        weight, bias = self.linear.weight, self.linear.bias
        x = src.take(out_rows).permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
        grad_2d = grad.permute(0, 2, 3, 1).reshape(-1, weight.shape[0]).to(x.dtype)
        grad_w = grad_2d.t().mm(x) if weight.requires_grad else None
        grad_b = grad_2d.sum(0) if bias is not None and bias.requires_grad else None
        grad_in = None
        if need_input:
            n, _, num_rows, width = grad.shape
            data = grad_2d.mm(weight.to(x.dtype)).reshape(n, num_rows, width, -1)
            grad_in = Packed(data.permute(0, 3, 1, 2), out_rows, src.height)
        return grad_in, [grad_w, grad_b]


class UnfoldMix:
    """Non-overlapping ``k x k`` patches (``nn.Unfold(k, stride=k)``) as the
    row-mixing op of a unit (mmdet's ``PatchMerging``): output channel
    ``c * k * k + i * k + j`` at ``(y, x)`` is input channel ``c`` at
    ``(k * y + i, k * x + j)``. The map's height and width must be multiples
    of ``k`` (pad before it, as ``PatchMerging``'s corner padding does).

    A rearrangement: it stores nothing (the tail re-runs from the input rows
    under the kept output rows) and its backward reads no values.

    Args:
        kernel: the patch size ``k``.
    """

    stores = False

    def __init__(self, kernel: int) -> None:
        self.kernel = kernel
        self.geometry = RowGeometry(kernel=kernel, stride=kernel, padding=0, dilation=1)

    def parameters(self) -> List[Optional[Tensor]]:
        return []

    def forward(self, x: Tensor) -> Tensor:
        n, c, height, width = x.shape
        k = self.kernel
        if height % k or width % k:
            raise ValueError(f'UnfoldMix: a {height}x{width} map is not a multiple of the '
                             f'{k}x{k} patches; pad it first')
        return F.unfold(x, k, stride=k).view(n, c * k * k, height // k, width // k)

    reference = forward

    def reads(self, out_rows: Tensor, in_height: int) -> Tensor:
        """Rows ``k * r .. k * r + k - 1`` of each output row ``r``, in order."""
        return (out_rows.unsqueeze(-1) * self.kernel + torch.arange(self.kernel)).flatten(-2)

    def backward_reads(self, out_rows: Tensor, in_height: int) -> Tensor:
        return out_rows[..., :0]  # no rows, shared or per image like ``out_rows``

    def rows(self, src: Packed, out_rows: Tensor) -> Tensor:
        return self.forward(src.take(self.reads(out_rows, src.height)))

    def backward(self, src: Optional[Packed], out_rows: Tensor, grad: Tensor,
                 need_input: bool, kept_input: bool = False
                 ) -> Tuple[Optional[Packed], ParamGrads]:
        if not need_input:
            return None, []
        n, _, num_rows, width = grad.shape
        k = self.kernel
        data = grad.reshape(n, -1, k, k, num_rows, width).permute(0, 1, 4, 2, 5, 3)
        data = data.reshape(n, -1, num_rows * k, width * k)
        return Packed(data, self.reads(out_rows, -1), height=-1), []  # rows and data only


class IdentityMix:
    """No row-mixing op: the tail reads the source directly (nothing stored)."""

    stores = False
    geometry = NO_HALO

    def parameters(self) -> List[Optional[Tensor]]:
        return []

    def forward(self, x: Tensor) -> Tensor:
        return x

    reference = forward

    def reads(self, out_rows: Tensor, in_height: int) -> Tensor:
        return out_rows

    def backward_reads(self, out_rows: Tensor, in_height: int) -> Tensor:
        return out_rows[..., :0]  # no rows, shared or per image like ``out_rows``

    def rows(self, src: Packed, out_rows: Tensor) -> Tensor:
        return src.take(out_rows)

    def backward(self, src: Optional[Packed], out_rows: Tensor, grad: Tensor,
                 need_input: bool, kept_input: bool = False
                 ) -> Tuple[Optional[Packed], ParamGrads]:
        return Packed(grad, out_rows, height=-1), []  # the caller reads rows and data only


class TailOp:
    """Base of the row-local ops (see the module docstring).

    Subclasses set ``reads`` when they read a second tensor and override
    ``reference``; ``forward`` and ``rows`` default to it (a stateless op).
    """

    reads: Optional[str] = None
    #: whether ``input_grad`` gives the op's input gradient (``exact_input_grad``)
    gives_input_grad: bool = False

    def parameters(self) -> List[Optional[Tensor]]:
        return []

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, other: Optional[Tensor]) -> Tuple[Tensor, Any]:
        return self.reference(x, other), None

    def rows(self, x: Tensor, other: Optional[Tensor], state: Any) -> Tensor:
        return self.reference(x, other)

    def input_grad(self, grad: Tensor, state: Any) -> Tensor:
        """The gradient of the op's input at every row from its output's, read
        from no stored values (``exact_input_grad``; ops that can set
        ``gives_input_grad``)."""
        raise NotImplementedError(f'{type(self).__name__} needs stored values for its '
                                  'input gradient')

    def check_call(self) -> None:
        """Raise what the op cannot run in its current mode (``SBPProgram.check_modes``:
        at the first training forward after each ``.train()``)."""

    def check_input_grad(self) -> None:
        """Raise where ``input_grad`` cannot run in the op's current mode
        (an op with ``gives_input_grad``; checked with ``check_call``)."""


class RowLocal(TailOp):
    """Any op that maps each position from its own channels: activations
    (``F.relu``, ``nn.GELU()``, ``nn.SiLU()``), a 1x1 stride-1 conv, a
    ``LayerNorm2d``. It must hold no batch statistics and draw no random numbers.

    Args:
        fn: the module or function, applied to ``(N, C, H, W)`` maps. An
            in-place activation (``nn.ReLU(inplace=True)``) runs out of place:
            its input may be a stored tensor.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        conv = fn if isinstance(fn, nn.Conv2d) else None
        if conv is not None and (conv.kernel_size[0] != 1 or conv.stride[0] != 1
                                 or conv.padding[0] != 0):
            raise TypeError('RowLocal: a conv in a unit tail must be 1x1, stride 1, no padding')
        if getattr(fn, 'inplace', False):
            fn = copy.copy(fn)
            fn.inplace = False
        self.fn = fn

    def parameters(self) -> List[Optional[Tensor]]:
        return list(self.fn.parameters()) if isinstance(self.fn, nn.Module) else []

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        return self.fn(x)


class ChannelsLast(TailOp):
    """Modules over the channel axis (``nn.Linear``, ``nn.LayerNorm``, and
    activations between them) of an ``(N, C, H, W)`` map: runs them in turn on
    the ``(N, H, W, C)`` view and moves channels back, as ConvNeXt-style blocks
    do (one permute around the whole sequence keeps the memory layout, and so
    the forward values, those of the dense block).

    Args:
        *fns: the modules or functions, applied to ``(N, H, W, C)`` tensors.
    """

    def __init__(self, *fns: Callable[[Tensor], Tensor]) -> None:
        self.fns = [RowLocal(fn).fn for fn in fns]

    def parameters(self) -> List[Optional[Tensor]]:
        return [p for fn in self.fns if isinstance(fn, nn.Module) for p in fn.parameters()]

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        for fn in self.fns:
            x = fn(x)
        return x.permute(0, 3, 1, 2)


class LayerScale(TailOp):
    """Multiplies channels by a learnt vector (ConvNeXt's ``gamma``).

    Args:
        scale: a parameter of shape ``(C,)``.
    """

    def __init__(self, scale: Tensor) -> None:
        self.scale = scale

    def parameters(self) -> List[Optional[Tensor]]:
        return [self.scale]

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        return x * self.scale.view(-1, 1, 1)


class Add(TailOp):
    """Adds the tensor ``name`` (a residual or shortcut): ``shortcut + x``.

    The shortcut comes first, as in ``x = shortcut + f(x)``: the sum takes its
    memory layout, so the next layer computes on the layout (and so the
    values) of the dense block.

    Args:
        name: ``'input'`` or an earlier unit of the program.
    """

    gives_input_grad = True

    def __init__(self, name: str) -> None:
        self.reads = name

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        return other + x

    def input_grad(self, grad: Tensor, state: Any) -> Tensor:
        return grad  # and the same to ``reads``


class ChannelSlice(TailOp):
    """Channels ``[start, start + width)`` of the map (a ``torch.split`` part,
    e.g. one scale of a Res2Net block).

    Args:
        start: first channel. width: number of channels.
    """

    def __init__(self, start: int, width: int) -> None:
        self.start, self.width = start, width

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        return x[:, self.start:self.start + self.width]


class Concat(TailOp):
    """Appends the channels of the tensor ``name``: ``torch.cat((x, name), 1)``.

    Args:
        name: ``'input'`` or an earlier unit of the program.
    """

    def __init__(self, name: str) -> None:
        self.reads = name

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        return torch.cat((x, other), 1)


class DropPath(TailOp):
    """Stochastic depth with per-sample masks (mmcv's or timm's ``DropPath``).

    The forward pass records the random state and the re-run on packed rows
    restores it, so the module draws the same per-sample mask (the draw must
    not depend on the map's height, which holds for per-sample drop paths).

    Args:
        module: the drop-path module, called on ``(N, C, H, W)`` maps.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        return self.module(x)

    def forward(self, x: Tensor, other: Optional[Tensor]) -> Tuple[Tensor, Any]:
        state = _rng_state(x.device)
        return self.module(x), state

    def rows(self, x: Tensor, other: Optional[Tensor], state: Any) -> Tensor:
        devices = [x.device] if x.device.type == 'cuda' else []
        with torch.random.fork_rng(devices=devices):
            _set_rng_state(x.device, state)
            return self.module(x)


def _rng_state(device: torch.device) -> Tuple[Tensor, Optional[Tensor]]:
    cuda = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: Tuple[Tensor, Optional[Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def relu() -> RowLocal:
    """The ReLU of a unit (functional: never in place on a stored tensor)."""
    return RowLocal(F.relu)


def is_relu(op: TailOp) -> bool:
    """Whether ``op`` is a ReLU (``relu()`` or an ``nn.ReLU`` module)."""
    return isinstance(op, RowLocal) and (op.fn in (F.relu, torch.relu)
                                         or type(op.fn) is nn.ReLU)


Mix = Union[ConvMix, PoolMix, LinearMix, UnfoldMix, IdentityMix]
