"""Convolutions evaluated on a subset of output rows, from packed input rows.

A *packed* tensor holds some rows of an ``(N, C, H, W)`` feature map as an
``(N, C, R, W)`` tensor together with the sorted indices of those rows. The
functions here compute a convolution's output, weight gradient and input
gradient at chosen output rows only, so SBP's backward work scales with the
kept rows. Runs of consecutive output rows become *bands*: each band is cut
out of the input together with the ``k - 1`` halo rows its kernel needs and
all bands of one length go through the ordinary convolution kernels as one
batch. Kernels of height 1 need no bands.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Packed:
    """Rows ``rows`` (sorted, unique) of a map of height ``height``."""

    data: Tensor
    rows: Tensor
    height: int

    def lookup(self) -> Tensor:
        """Map absolute row -> position in ``data``; absent rows -> ``len(rows)``."""
        lut = torch.full((self.height + 1,), len(self.rows), dtype=torch.long,
                         device=self.rows.device)
        lut[self.rows] = torch.arange(len(self.rows), device=self.rows.device)
        return lut

    def take(self, rows: Tensor) -> Tensor:
        """Values at absolute ``rows``; rows absent or outside the map are zero."""
        if rows is self.rows or (len(rows) == len(self.rows) and torch.equal(rows, self.rows)):
            return self.data
        index = self.lookup()[rows.clamp(-1, self.height).masked_fill(rows < 0, self.height)]
        return _with_zero_row(self.data).index_select(2, index)


def _with_zero_row(data: Tensor) -> Tensor:
    n, c, _, w = data.shape
    return torch.cat([data, data.new_zeros(n, c, 1, w)], dim=2)


@dataclass(frozen=True)
class RowGeometry:
    """A convolution's geometry along the height axis."""

    kernel: int
    stride: int
    padding: int
    dilation: int

    @classmethod
    def of(cls, conv: nn.Conv2d) -> 'RowGeometry':
        if isinstance(conv.padding, str):
            raise ValueError(f'SBP needs numeric conv padding, got {conv.padding!r}')
        return cls(conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])

    def input_rows(self, out_rows: Tensor, in_height: int) -> Tensor:
        """Input rows that the outputs at ``out_rows`` read (inside the map)."""
        taps = torch.arange(self.kernel, device=out_rows.device) * self.dilation - self.padding
        rows = (out_rows[:, None] * self.stride + taps).flatten()
        return torch.unique(rows[(rows >= 0) & (rows < in_height)])

    def bands(self, out_rows: Tensor) -> List[Tuple[Tensor, Tensor, int]]:
        """Group ``out_rows`` into bands of equal length.

        Returns, per band length ``t``, ``(in_index, out_pos, nb)``: the
        absolute input rows of the ``nb`` bands (``nb * L`` with ``L`` the
        band's input height, halo included) and the positions in ``out_rows``
        of their ``nb * t`` outputs. A kernel of height 1 reads one input row
        per output row, so all rows form one band that is convolved with a
        row stride of 1.
        """
        if self.kernel == 1:
            return [(out_rows * self.stride - self.padding,
                     torch.arange(len(out_rows), device=out_rows.device), 1)]
        breaks = torch.nonzero(torch.diff(out_rows) != 1).flatten() + 1
        starts_pos = torch.cat([breaks.new_zeros(1), breaks])
        lengths = torch.diff(torch.cat([starts_pos, breaks.new_tensor([len(out_rows)])]))
        groups = []
        for t in torch.unique(lengths).tolist():
            first = starts_pos[lengths == t]
            span = (t - 1) * self.stride + (self.kernel - 1) * self.dilation + 1
            in_index = (out_rows[first][:, None] * self.stride - self.padding
                        + torch.arange(span, device=out_rows.device)).flatten()
            out_pos = (first[:, None] + torch.arange(t, device=out_rows.device)).flatten()
            groups.append((in_index, out_pos, len(first)))
        return groups


def _to_bands(data: Tensor, count: int) -> Tensor:
    """(N, C, count * L, W) -> (N * count, C, L, W)."""
    n, c, rows, w = data.shape
    return data.view(n, c, count, rows // count, w).transpose(1, 2).reshape(
        n * count, c, rows // count, w)


def _from_bands(data: Tensor, n: int) -> Tensor:
    """(N * count, C, L, W) -> (N, C, count * L, W)."""
    nb, c, rows, w = data.shape
    return data.view(n, nb // n, c, rows, w).transpose(1, 2).reshape(n, c, -1, w)


def _conv_args(conv: nn.Conv2d, geom: RowGeometry) -> dict:
    return dict(stride=(1 if geom.kernel == 1 else geom.stride, conv.stride[1]),
                padding=(0, conv.padding[1]), dilation=(geom.dilation, conv.dilation[1]),
                groups=conv.groups)


def conv_rows(conv: nn.Conv2d, src: Packed, out_rows: Tensor) -> Tensor:
    """``conv(x)[:, :, out_rows]`` computed from the packed rows ``src`` of x."""
    geom = RowGeometry.of(conv)
    n = src.data.shape[0]
    out = None
    for in_index, out_pos, count in geom.bands(out_rows):
        bands = _to_bands(src.take(in_index), count)
        res = _from_bands(F.conv2d(bands, conv.weight, conv.bias, **_conv_args(conv, geom)), n)
        if out is None:
            out = res.new_empty(n, res.shape[1], len(out_rows), res.shape[3])
        out[:, :, out_pos] = res
    return out


def conv_rows_backward(conv: nn.Conv2d, src: Packed, out_rows: Tensor, grad_out: Tensor,
                       need_input: bool) -> Tuple[Optional[Packed], Optional[Tensor],
                                                  Optional[Tensor]]:
    """Gradients of ``conv`` evaluated at ``out_rows`` only.

    Args:
        src: packed input rows, covering ``input_rows(out_rows)``.
        grad_out: ``(N, C_out, len(out_rows), W_out)`` gradient at those rows.
        need_input: whether to compute the input gradient.

    Returns:
        ``(grad_input, grad_weight, grad_bias)``; ``grad_input`` is packed at
        ``src.rows``. Entries whose tensors do not need gradients are None.
    """
    geom = RowGeometry.of(conv)
    n = src.data.shape[0]
    need_w = conv.weight.requires_grad
    need_b = conv.bias is not None and conv.bias.requires_grad
    grad_in = src.data.new_zeros(n, src.data.shape[1], len(src.rows) + 1,
                                 src.data.shape[3]) if need_input else None
    grad_w = grad_b = None
    lut = src.lookup()
    for in_index, out_pos, count in geom.bands(out_rows):
        bands = _to_bands(src.take(in_index), count)
        g_bands = _to_bands(grad_out.index_select(2, out_pos), count)
        args = _conv_args(conv, geom)
        gi, gw, gb = torch.ops.aten.convolution_backward(
            g_bands, bands, conv.weight, [conv.weight.shape[0]] if need_b else None,
            list(args['stride']), list(args['padding']), list(args['dilation']), False, [0, 0],
            args['groups'], [need_input, need_w, need_b])
        if need_input:
            position = lut[in_index.clamp(-1, src.height).masked_fill(in_index < 0, src.height)]
            grad_in.index_add_(2, position, _from_bands(gi, n))
        if need_w:
            grad_w = gw if grad_w is None else grad_w + gw
        if need_b:
            grad_b = gb if grad_b is None else grad_b + gb
    packed_in = Packed(grad_in[:, :, :-1], src.rows, src.height) if need_input else None
    return packed_in, grad_w, grad_b
