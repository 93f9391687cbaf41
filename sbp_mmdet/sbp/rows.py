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
stream synchronisation, once per index tensor); rows move with one indexing
op per tensor (few large ops: on a busy CPU each op pays a thread-pool
synchronisation), and shared rows with ``index_select``/``index_copy_``
rather than advanced indexing (``x[:, :, rows]``), which is several times
slower on the CPU. The bookkeeping on row sets (halos, bands, positions) is
memoised by the rows' values (``index_cache.py``): a mask layout seen before
costs no index operator.

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

from .index_cache import memoised, same_rows, to_device


def gather_rows(data: Tensor, positions: Tensor) -> Tensor:
    """``data[:, :, positions]``, per image for ``(N, R)`` positions (one
    indexing op; ``data`` itself for all rows)."""
    if _all_rows(positions, data.shape[2]):
        return data
    if positions.dim() == 2:
        return torch.gather(data, 2, _row_index(to_device(positions, data.device), data.shape))
    return data.index_select(2, to_device(positions, data.device))


@memoised
def _all_rows(positions: Tensor, height: int) -> bool:
    """Whether ``positions`` are ``0 .. height - 1`` in order (for every image)."""
    count = positions.shape[-1]
    return count == height and bool((positions == torch.arange(count)).all())


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
            if same_rows(known, rows):
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


@memoised
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
    return _union_rows(height, *parts)


@memoised
def _union_rows(height: int, *parts: Tensor) -> Tensor:
    joined = torch.cat(parts, dim=-1)
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
        per_image = self.rows.dim() == 2 or rows.dim() == 2
        return _positions(self.rows, self.height, rows, self.data.shape[0] if per_image else 0)

    def image(self, index: int) -> 'Packed':
        """Image ``index`` alone, with its own row list."""
        rows = self.rows[index] if self.rows.dim() == 2 else self.rows
        return Packed(self.data[index:index + 1], rows, self.height)

    def take(self, rows: Tensor) -> Tensor:
        """Values at absolute ``rows``; rows absent or outside the map are zero."""
        if same_rows(rows, self.rows):
            return self.data
        return _gather_or_zero(self.data, self.positions(rows))


@memoised
def _positions(own: Tensor, height: int, rows: Tensor, n: int) -> Tensor:
    """``Packed.positions`` of rows ``own`` of a map of ``height`` (``n`` images
    when either row set is per image, else 0)."""
    inside = (rows >= 0) & (rows < height)
    clamped = rows.clamp(0, height - 1)
    if not n:
        lut = torch.full((height,), -1, dtype=torch.long)
        lut[own] = torch.arange(len(own))
        return torch.where(inside, lut[clamped], -1)
    own = own.expand(n, -1)
    lut = torch.full((n, height), -1, dtype=torch.long)
    lut.scatter_(1, own, torch.arange(own.shape[1]).expand_as(own))
    return torch.where(inside, lut.gather(1, clamped.expand(n, -1)), -1)


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

    @memoised
    def input_rows(self, out_rows: Tensor, in_height: int) -> Tensor:
        """Input rows that the outputs at ``out_rows`` read (inside the map)."""
        if out_rows.dim() == 2:
            return stack_rows([self.input_rows(rows, in_height) for rows in out_rows],
                              in_height)
        taps = torch.arange(self.kernel) * self.dilation - self.padding
        rows = (out_rows[:, None] * self.stride + taps).flatten()
        return torch.unique(rows[(rows >= 0) & (rows < in_height)])

    @memoised
    def bands(self, out_rows: Tensor) -> List['Band']:
        """Group ``out_rows`` into runs (bands) of equal length, one ``Band``
        per length."""
        breaks = torch.nonzero(torch.diff(out_rows) != 1).flatten() + 1
        starts = torch.cat([breaks.new_zeros(1), breaks])
        lengths = torch.diff(torch.cat([starts, breaks.new_tensor([len(out_rows)])]))
        groups = []
        for t in torch.unique(lengths).tolist():
            first = starts[lengths == t]
            groups.append(Band(out_rows[first] * self.stride - self.padding,
                               (first[:, None] + torch.arange(t)).flatten(), t,
                               (t - 1) * self.stride + self.span))
        return groups


@dataclass(frozen=True)
class Band:
    """The runs of one length ``t`` of a conv's output rows.

    ``first_in``: the first input row each run reads (``first_out * stride -
    padding``); ``out_pos``: the positions of the runs' outputs in the output
    row set (run-major); ``length``: the ``(t - 1) * stride + span`` input rows
    a run reads.
    """

    first_in: Tensor
    out_pos: Tensor
    t: int
    length: int

    @property
    def count(self) -> int:
        return len(self.first_in)


@memoised
def _shifted(rows: Tensor, stride: int, padding: int) -> Tensor:
    """``rows * stride - padding``: the input rows of a 1-row kernel's outputs."""
    return rows * stride - padding


@memoised
def _absent(positions: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """``positions`` with -1 clamped to 0, and where they were -1 (indices for
    ``(R,)`` positions, a mask for ``(N, R)``; None when none is)."""
    absent = positions < 0
    if not bool(absent.any()):
        return positions, None
    where = absent[:, None, :, None] if positions.dim() == 2 else torch.nonzero(absent).flatten()
    return positions.clamp(min=0), where


@memoised
def _present(positions: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """The positions that are not -1, and their indices (None when all are)."""
    inside = positions >= 0
    if bool(inside.all()):
        return positions, None
    keep = torch.nonzero(inside).flatten()
    return positions[keep], keep


@memoised
def _band_input_rows(first_in: Tensor, length: int) -> Tensor:
    """The input rows of runs of ``length`` rows from ``first_in``, run-major."""
    return (first_in[:, None] + torch.arange(length)).flatten()


def _gather_or_zero(data: Tensor, positions: Tensor) -> Tensor:
    """``data[:, :, positions]`` with zero rows where ``positions`` is -1."""
    if len(data.shape) and data.shape[2] == 0:
        n, c, _, w = data.shape
        return data.new_zeros(n, c, positions.shape[-1], w)
    clamped, absent = _absent(positions)
    out = gather_rows(data, clamped)
    if absent is None:
        return out
    if out is data:  # the clamped positions happen to be all rows: do not zero ``data``
        out = out.clone()
    if positions.dim() == 2:
        return out.masked_fill_(to_device(absent, out.device), 0)
    return out.index_fill_(2, to_device(absent, out.device), 0)


def _band_positions(src: Packed, first_in: Tensor, length: int) -> Tensor:
    """Positions in ``src`` of the rows of each band, band-major; -1 outside."""
    return src.positions(_band_input_rows(first_in, length))


def _band_batch(src: Packed, first_in: Tensor, length: int) -> Tensor:
    """Input bands of ``length`` rows starting at absolute rows ``first_in``
    as an ``(N * nb, C, length, W)`` batch (zeros outside the map)."""
    return _to_bands(_gather_or_zero(src.data, _band_positions(src, first_in, length)),
                     len(first_in))


def _scatter_bands_(grad: Packed, first_in: Tensor, bands: Tensor) -> None:
    """Add ``(N * nb, C, length, W)`` band gradients into the packed ``grad``."""
    rows = _unband(bands, grad.data.shape[0])
    positions, keep = _present(_band_positions(grad, first_in, bands.shape[2]))
    if keep is not None:
        rows = gather_rows(rows, keep)
    add_rows_(grad.data, positions, rows)


def _to_bands(rows: Tensor, count: int) -> Tensor:
    """(N, C, nb * t, W) band-major rows -> an (N * nb, C, t, W) batch (``rows``
    itself for one band)."""
    if count == 1:
        return rows
    n, c, _, w = rows.shape
    return rows.view(n, c, count, -1, w).transpose(1, 2).reshape(n * count, c, -1, w)


def _unband(data: Tensor, n: int) -> Tensor:
    """(N * nb, C, t, W) -> (N, C, nb * t, W), band-major rows (``data`` itself
    for one band)."""
    nb, c, t, w = data.shape
    if nb == n:
        return data
    return data.view(n, nb // n, c, t, w).transpose(1, 2).reshape(n, c, -1, w)


def _band_rows(data: Tensor, out_pos: Tensor, count: int) -> Tensor:
    """Rows ``out_pos`` (band-major) of ``data`` as an (N * nb, C, t, W) batch."""
    return _to_bands(gather_rows(data, out_pos), count)


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
        return F.conv2d(src.take(_shifted(out_rows, geom.stride, geom.padding)), weight, bias,
                        args['stride'], args['padding'], args['dilation'], args['groups'])
    args = _conv_args(conv, geom.stride)
    bands = geom.bands(out_rows)
    out = None
    for band in bands:
        res = F.conv2d(_band_batch(src, band.first_in, band.length), weight, bias,
                       args['stride'], args['padding'], args['dilation'], args['groups'])
        if len(bands) == 1:  # one run length: the runs' outputs are the rows in order
            return _unband(res, n)
        if out is None:
            out = res.new_empty(n, res.shape[1], len(out_rows), res.shape[3])
        out.index_copy_(2, to_device(band.out_pos, out.device), _unband(res, n))
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
        in_rows = _shifted(out_rows, geom.stride, geom.padding)
        args = _conv_args(conv, 1)
        gi, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, src.take(in_rows), weight, bias_sizes, args['stride'],
            args['padding'], args['dilation'], False, [0, 0], args['groups'], mask)
        grad_in = None
        if need_input and same_rows(in_rows, src.rows):
            grad_in = Packed(gi, src.rows, src.height)  # one output row per stored row
        elif need_input:
            grad_in = Packed(src.data.new_zeros(src.data.shape), src.rows, src.height)
            positions, keep = _present(grad_in.positions(in_rows))
            add_rows_(grad_in.data, positions, gi if keep is None else gather_rows(gi, keep))
        return grad_in, gw, gb
    args = _conv_args(conv, geom.stride)
    # a stride-1 "same" conv whose input keeps the output's rows: the input gradient of each
    # band from its output gradient alone (rows outside a band are dropped: zero gradient),
    # at the band's own rows, not at its halo
    at_kept = need_input and kept_input and geom.stride == 1 \
        and geom.span == 2 * geom.padding + 1
    all_bands = geom.bands(out_rows)
    grad_in = None
    if at_kept:
        mask[0] = False
        if len(all_bands) > 1:
            grad_in = Packed(grad_out.new_empty(src.data.shape[0], src.data.shape[1],
                                                len(out_rows), src.data.shape[3]),
                             out_rows, src.height)
    elif need_input:
        grad_in = Packed(src.data.new_zeros(src.data.shape), src.rows, src.height)
    grad_w = grad_b = None
    for band in all_bands:
        bands = _band_batch(src, band.first_in, band.length)
        grad_bands = _band_rows(grad_out, band.out_pos, band.count)
        gi, gw, gb = torch.ops.aten.convolution_backward(
            grad_bands, bands, weight, bias_sizes, args['stride'], args['padding'],
            args['dilation'], False, [0, 0], args['groups'], mask)
        if at_kept:
            gi = _unband(torch.nn.grad.conv2d_input(
                (grad_bands.shape[0], bands.shape[1], band.t, bands.shape[3]), weight,
                grad_bands, conv.stride, conv.padding, conv.dilation, conv.groups),
                src.data.shape[0])
            if len(all_bands) == 1:  # one run length: the runs' rows are the rows in order
                grad_in = Packed(gi, out_rows, src.height)
            else:
                grad_in.data.index_copy_(2, to_device(band.out_pos, gi.device), gi)
        elif need_input:
            _scatter_bands_(grad_in, band.first_in, gi)
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
