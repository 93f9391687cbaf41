"""Convolutions evaluated on a subset of output rows, from packed input rows.

A *packed* tensor holds some rows of an ``(N, C, H, W)`` feature map as an
``(N, C, R, W)`` tensor together with the sorted indices of those rows. The
functions here compute a convolution's output, weight gradient and input
gradient at chosen output rows only, so SBP's backward work scales with the
kept rows. Runs of consecutive output rows become *bands*: each band is cut
out of the input together with the ``k - 1`` halo rows its kernel needs, and
all bands of one length go through the ordinary convolution kernels as one
batch. Kernels of height 1 need no bands.

Row indices live on the CPU (``to_device`` moves them to a GPU without a
stream synchronisation); rows move with one indexing op per tensor (few
large ops: on a busy CPU each op pays a thread-pool synchronisation), and
shared rows with ``index_select``/``index_copy_`` rather than advanced
indexing (``x[:, :, rows]``), which is several times slower on the CPU.

Row sets are ``(R,)`` tensors, shared by every image of the batch, or ``(N, R)``
tensors, one sorted row list per image (per-image masks; every image has the
same count, so packed tensors stay ``(N, C, R, W)``). Gathers and scatters of
per-image rows are one ``gather``/``scatter_add`` op; convolutions at per-image
rows run image by image (each image's bands differ).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_device(index: Tensor, device: torch.device) -> Tensor:
    """``index`` (row indices or a row mask, kept on the CPU) on ``device``.

    To a GPU the copy goes through pinned memory and does not block: a plain
    ``.to(device)`` from pageable memory makes the host wait for every kernel
    already queued on the stream, once per row op. PyTorch's pinned-memory
    cache keeps the staging buffer until the copy has run.
    """
    if index.device == device:
        return index
    if device.type == 'cuda':
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def gather_rows(data: Tensor, positions: Tensor) -> Tensor:
    """``data[:, :, positions]``, per image for ``(N, R)`` positions (one
    indexing op; ``data`` itself for all rows)."""
    count = positions.shape[-1]
    if count == data.shape[2] and bool((positions == torch.arange(count)).all()):
        return data
    if positions.dim() == 2:
        return torch.gather(data, 2, _row_index(to_device(positions, data.device), data.shape))
    return data.index_select(2, to_device(positions, data.device))


def add_rows_(out: Tensor, positions: Tensor, src: Tensor) -> Tensor:
    """``out[:, :, positions] += src`` (per image for ``(N, R)`` positions);
    repeated positions accumulate."""
    if positions.dim() == 2:
        return out.scatter_add_(2, _row_index(to_device(positions, out.device), src.shape), src)
    return out.index_add_(2, to_device(positions, out.device), src)


def _row_index(positions: Tensor, shape: Sequence[int]) -> Tensor:
    """``(N, R)`` row positions as a gather/scatter index over ``(N, C, R, W)``
    (an expanded view: no copy)."""
    n, c, _, w = shape
    return positions[:, None, :, None].expand(n, c, positions.shape[1], w)


class RowSum:
    """The sum of gradients that arrive at rows of one map, made full once.

    Contributions at equal row sets are summed packed; ``full`` writes the
    first row set into a zero map (``index_copy_``, or no copy when it holds
    every row) and adds the others. Adding each contribution to a zero map as
    it arrives would cost a scatter-add each (on the CPU a slow loop in half
    precision).

    Args:
        shape: the ``(N, C, H, W)`` shape of the map.
        dtype: the dtype of the full map.
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.shape, self.dtype = tuple(shape), dtype
        self.parts: List[Tuple[Tensor, Tensor]] = []

    def add(self, rows: Tensor, grad: Tensor) -> None:
        """Add ``grad``, the gradient at ``rows`` (sorted and unique)."""
        grad = grad.to(self.dtype)
        for i, (known, total) in enumerate(self.parts):
            if known.shape == rows.shape and torch.equal(known, rows):
                self.parts[i] = (known, total + grad)
                return
        self.parts.append((rows, grad))

    def full(self, like: Tensor) -> Tensor:
        """The summed gradient as a full map (zeros where nothing arrived), on
        ``like``'s device."""
        if not self.parts:
            return like.new_zeros(self.shape, dtype=self.dtype)
        (rows, data), rest = self.parts[0], self.parts[1:]
        height = self.shape[2]
        if rows.dim() == 1 and len(rows) == height:
            out = data.clone() if rest else data  # every row, in order: no scatter
        elif rows.dim() == 2:
            out = data.new_zeros(self.shape).scatter_(2, _row_index(to_device(rows, data.device),
                                                                    data.shape), data)
        else:
            out = data.new_zeros(self.shape).index_copy_(2, to_device(rows, data.device), data)
        for rows, data in rest:
            add_rows_(out, rows, data)
        return out


def stack_rows(parts: Sequence[Tensor], height: int) -> Tensor:
    """Per-image sorted row lists as one ``(N, R)`` tensor, ``R`` the longest
    list's length: shorter lists get absent rows added from the bottom up."""
    size = max(len(part) for part in parts)
    filled = []
    for part in parts:
        if len(part) < size:
            absent = torch.ones(height, dtype=torch.bool)
            absent[part] = False
            extra = torch.nonzero(absent).flatten()[len(part) - size:]
            part = torch.sort(torch.cat([part, extra])).values
        filled.append(part)
    return torch.stack(filled)


def contains_rows(rows: Tensor, subset: Tensor) -> bool:
    """Whether every row of ``subset`` is in ``rows`` (image by image for (N, R))."""
    if rows.dim() != subset.dim():
        return False
    if rows.dim() == 1:
        return bool(torch.isin(subset, rows).all())
    return len(rows) == len(subset) and all(
        bool(torch.isin(s, r).all()) for r, s in zip(rows, subset))


def union_rows(parts: Sequence[Tensor], height: int) -> Tensor:
    """Sorted union of row sets (image by image for (N, R), then ``stack_rows``)."""
    joined = torch.cat(list(parts), dim=-1)
    if joined.dim() == 1:
        return torch.unique(joined)
    return stack_rows([torch.unique(rows) for rows in joined], height)


@dataclass(frozen=True)
class Packed:
    """Rows ``rows`` (sorted, unique, on the CPU) of a map of height ``height``."""

    data: Tensor
    rows: Tensor
    height: int

    def positions(self, rows: Tensor) -> Tensor:
        """Positions of absolute ``rows`` in ``data``; -1 where a row is absent
        (image by image when either row set is per image)."""
        inside = (rows >= 0) & (rows < self.height)
        clamped = rows.clamp(0, self.height - 1)
        if self.rows.dim() == 1 and rows.dim() == 1:
            lut = torch.full((self.height,), -1, dtype=torch.long)
            lut[self.rows] = torch.arange(len(self.rows))
            return torch.where(inside, lut[clamped], -1)
        n = self.data.shape[0]
        own = self.rows.expand(n, -1)
        lut = torch.full((n, self.height), -1, dtype=torch.long)
        lut.scatter_(1, own, torch.arange(own.shape[1]).expand_as(own))
        return torch.where(inside, lut.gather(1, clamped.expand(n, -1)), -1)

    def image(self, index: int) -> 'Packed':
        """Image ``index`` alone, with its own row list."""
        rows = self.rows[index] if self.rows.dim() == 2 else self.rows
        return Packed(self.data[index:index + 1], rows, self.height)

    def take(self, rows: Tensor) -> Tensor:
        """Values at absolute ``rows``; rows absent or outside the map are zero."""
        if rows is self.rows or (rows.shape == self.rows.shape and torch.equal(rows, self.rows)):
            return self.data
        return _gather_or_zero(self.data, self.positions(rows))


@dataclass(frozen=True)
class RowGeometry:
    """A convolution's geometry along the height axis."""

    kernel: int
    stride: int
    padding: int
    dilation: int

    @classmethod
    def of(cls, conv: nn.Conv2d) -> 'RowGeometry':
        return cls(conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])

    @property
    def span(self) -> int:
        return (self.kernel - 1) * self.dilation + 1

    def input_rows(self, out_rows: Tensor, in_height: int) -> Tensor:
        """Input rows that the outputs at ``out_rows`` read (inside the map)."""
        if out_rows.dim() == 2:
            return stack_rows([self.input_rows(rows, in_height) for rows in out_rows], in_height)
        taps = torch.arange(self.kernel) * self.dilation - self.padding
        rows = (out_rows[:, None] * self.stride + taps).flatten()
        return torch.unique(rows[(rows >= 0) & (rows < in_height)])

    def bands(self, out_rows: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """Group ``out_rows`` into runs of equal length ``t``.

        Returns, per length, ``(first_rows, out_pos)``: the first output row
        of each band and the positions in ``out_rows`` of the bands' outputs
        (band-major). A band of ``t`` outputs reads the ``(t - 1) * stride +
        span`` input rows from ``first_row * stride - padding`` on.
        """
        breaks = torch.nonzero(torch.diff(out_rows) != 1).flatten() + 1
        starts = torch.cat([breaks.new_zeros(1), breaks])
        lengths = torch.diff(torch.cat([starts, breaks.new_tensor([len(out_rows)])]))
        groups = []
        for t in torch.unique(lengths).tolist():
            first = starts[lengths == t]
            groups.append((out_rows[first], (first[:, None] + torch.arange(t)).flatten()))
        return groups


def _gather_or_zero(data: Tensor, positions: Tensor) -> Tensor:
    """``data[:, :, positions]`` with zero rows where ``positions`` is -1."""
    if len(data.shape) and data.shape[2] == 0:
        n, c, _, w = data.shape
        return data.new_zeros(n, c, positions.shape[-1], w)
    out = gather_rows(data, positions.clamp(min=0))
    absent = positions < 0
    if not bool(absent.any()):
        return out
    if out is data:  # the clamped positions happen to be all rows: do not zero ``data``
        out = out.clone()
    if positions.dim() == 2:
        return out.masked_fill_(to_device(absent[:, None, :, None], out.device), 0)
    return out.index_fill_(2, to_device(torch.nonzero(absent).flatten(), out.device), 0)


def _band_positions(src: Packed, first_in: Tensor, length: int) -> Tensor:
    """Positions in ``src`` of the rows of each band, band-major; -1 outside."""
    return src.positions((first_in[:, None] + torch.arange(length)).flatten())


def _band_batch(src: Packed, first_in: Tensor, length: int) -> Tensor:
    """Input bands of ``length`` rows starting at absolute rows ``first_in``
    as an ``(N * nb, C, length, W)`` batch (zeros outside the map)."""
    n, c, _, w = src.data.shape
    rows = _gather_or_zero(src.data, _band_positions(src, first_in, length))
    return rows.view(n, c, len(first_in), length, w).transpose(1, 2).reshape(
        n * len(first_in), c, length, w)


def _scatter_bands_(grad: Packed, first_in: Tensor, bands: Tensor) -> None:
    """Add ``(N * nb, C, length, W)`` band gradients into the packed ``grad``."""
    n, c, length, w = grad.data.shape[0], bands.shape[1], bands.shape[2], bands.shape[3]
    rows = bands.view(n, -1, c, length, w).transpose(1, 2).reshape(n, c, -1, w)
    positions = _band_positions(grad, first_in, length)
    inside = positions >= 0
    if not bool(inside.all()):
        keep = torch.nonzero(inside).flatten()
        rows, positions = gather_rows(rows, keep), positions[keep]
    add_rows_(grad.data, positions, rows)


def _unband(data: Tensor, n: int) -> Tensor:
    """(N * nb, C, t, W) -> (N, C, nb * t, W), band-major rows."""
    nb, c, t, w = data.shape
    return data.view(n, nb // n, c, t, w).transpose(1, 2).reshape(n, c, -1, w)


def _band_rows(data: Tensor, out_pos: Tensor, count: int) -> Tensor:
    """Rows ``out_pos`` (band-major) of ``data`` as an (N * nb, C, t, W) batch."""
    n, c, _, w = data.shape
    rows = gather_rows(data, out_pos)
    return rows.view(n, c, count, -1, w).transpose(1, 2).reshape(n * count, c, -1, w)


def _conv_args(conv: nn.Conv2d, row_stride: int) -> dict:
    return dict(stride=[row_stride, conv.stride[1]], padding=[0, conv.padding[1]],
                dilation=list(conv.dilation), groups=conv.groups)


def _weights(conv: nn.Conv2d, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """The conv's weight and bias in ``dtype`` (the packed rows' dtype: autocast's
    half-precision copies under mixed precision, the parameters themselves otherwise)."""
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return conv.weight.to(dtype), bias


def conv_rows(conv: nn.Conv2d, src: Packed, out_rows: Tensor) -> Tensor:
    """``conv(x)[:, :, out_rows]`` computed from the packed rows ``src`` of x."""
    if out_rows.dim() == 2:
        return torch.cat([conv_rows(conv, src.image(i), rows) for i, rows in enumerate(out_rows)])
    geom = RowGeometry.of(conv)
    n = src.data.shape[0]
    weight, bias = _weights(conv, src.data.dtype)
    if geom.kernel == 1:
        args = _conv_args(conv, 1)
        return F.conv2d(src.take(out_rows * geom.stride - geom.padding), weight, bias,
                        args['stride'], args['padding'], args['dilation'], args['groups'])
    args = _conv_args(conv, geom.stride)
    out = None
    for first, out_pos in geom.bands(out_rows):
        t = len(out_pos) // len(first)
        length = (t - 1) * geom.stride + geom.span
        res = F.conv2d(_band_batch(src, first * geom.stride - geom.padding, length), weight,
                       bias, args['stride'], args['padding'], args['dilation'], args['groups'])
        if out is None:
            out = res.new_empty(n, res.shape[1], len(out_rows), res.shape[3])
        out.index_copy_(2, to_device(out_pos, out.device), _unband(res, n))
    return out


def conv_rows_backward(conv: nn.Conv2d, src: Packed, out_rows: Tensor, grad_out: Tensor,
                       need_input: bool, kept_input: bool = False
                       ) -> Tuple[Optional[Packed], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``conv`` evaluated at ``out_rows`` only.

    Args:
        src: packed input rows, covering ``input_rows(out_rows)``.
        grad_out: ``(N, C_out, len(out_rows), W_out)`` gradient at those rows.
        need_input: whether to compute the input gradient.
        kept_input: the caller keeps the input gradient at ``out_rows`` only
            (the input's kept rows are the output's). A stride-1 conv with
            "same" padding then computes it there alone, not at the halo rows.

    Returns:
        ``(grad_input, grad_weight, grad_bias)`` in the dtype of ``src``;
        ``grad_input`` is packed at ``src.rows`` (at ``out_rows`` where
        ``kept_input`` applies). Entries whose tensors do not need gradients
        are None.
    """
    if out_rows.dim() == 2:
        return _per_image_backward(conv, src, out_rows, grad_out, need_input, kept_input)
    geom = RowGeometry.of(conv)
    weight, _ = _weights(conv, src.data.dtype)
    mask = [need_input, conv.weight.requires_grad,
            conv.bias is not None and conv.bias.requires_grad]
    bias_sizes = [conv.weight.shape[0]] if mask[2] else None
    if geom.kernel == 1:
        in_rows = out_rows * geom.stride - geom.padding
        args = _conv_args(conv, 1)
        gi, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, src.take(in_rows), weight, bias_sizes, args['stride'],
            args['padding'], args['dilation'], False, [0, 0], args['groups'], mask)
        grad_in = None
        if need_input and len(in_rows) == len(src.rows) and torch.equal(in_rows, src.rows):
            grad_in = Packed(gi, src.rows, src.height)  # one output row per stored row
        elif need_input:
            grad_in = Packed(src.data.new_zeros(src.data.shape), src.rows, src.height)
            inside = (in_rows >= 0) & (in_rows < src.height)
            add_rows_(grad_in.data, grad_in.positions(in_rows[inside]),
                      gather_rows(gi, torch.nonzero(inside).flatten()))
        return grad_in, gw, gb
    args = _conv_args(conv, geom.stride)
    # a stride-1 "same" conv whose input keeps the output's rows: the input gradient of each
    # band from its output gradient alone (rows outside a band are dropped: zero gradient),
    # at the band's own rows, not at its halo
    at_kept = need_input and kept_input and geom.stride == 1 \
        and geom.span == 2 * geom.padding + 1
    grad_in = None
    if at_kept:
        mask[0] = False
        grad_in = Packed(grad_out.new_empty(src.data.shape[0], src.data.shape[1],
                                            len(out_rows), src.data.shape[3]),
                         out_rows, src.height)
    elif need_input:
        grad_in = Packed(src.data.new_zeros(src.data.shape), src.rows, src.height)
    grad_w = grad_b = None
    for first, out_pos in geom.bands(out_rows):
        count = len(first)
        t = len(out_pos) // count
        first_in = first * geom.stride - geom.padding
        bands = _band_batch(src, first_in, (t - 1) * geom.stride + geom.span)
        grad_bands = _band_rows(grad_out, out_pos, count)
        gi, gw, gb = torch.ops.aten.convolution_backward(
            grad_bands, bands, weight, bias_sizes, args['stride'], args['padding'],
            args['dilation'], False, [0, 0], args['groups'], mask)
        if at_kept:
            gi = torch.nn.grad.conv2d_input(
                (grad_bands.shape[0], bands.shape[1], t, bands.shape[3]), weight, grad_bands,
                conv.stride, conv.padding, conv.dilation, conv.groups)
            grad_in.data.index_copy_(2, to_device(out_pos, gi.device),
                                     _unband(gi, src.data.shape[0]))
        elif need_input:
            _scatter_bands_(grad_in, first_in, gi)
        if mask[1]:
            grad_w = gw if grad_w is None else grad_w + gw
        if mask[2]:
            grad_b = gb if grad_b is None else grad_b + gb
    return grad_in, grad_w, grad_b


def _per_image_backward(conv: nn.Conv2d, src: Packed, out_rows: Tensor, grad_out: Tensor,
                        need_input: bool, kept_input: bool
                        ) -> Tuple[Optional[Packed], Optional[Tensor], Optional[Tensor]]:
    """``conv_rows_backward`` at per-image rows: image by image, parameter
    gradients summed."""
    results = [conv_rows_backward(conv, src.image(i), rows, grad_out[i:i + 1], need_input,
                                  kept_input)
               for i, rows in enumerate(out_rows)]
    grad_in = None
    if need_input:
        grad_in = Packed(torch.cat([r[0].data for r in results]),
                         torch.stack([r[0].rows for r in results]), src.height)
    return grad_in, _sum_or_none([r[1] for r in results]), _sum_or_none([r[2] for r in results])


def _sum_or_none(grads: List[Optional[Tensor]]) -> Optional[Tensor]:
    return None if grads[0] is None else torch.stack(grads).sum(dim=0)
