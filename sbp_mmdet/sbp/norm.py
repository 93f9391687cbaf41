"""BatchNorm and GroupNorm forward and backward on packed rows, with full-map statistics.

In train mode BatchNorm normalises with the mean and variance of *all*
positions of the batch, so the forward pass stays exact. In backward the
gradient through those statistics is kept exactly for the kept rows: with
``g`` the incoming gradient (zero at dropped rows), ``n`` the number of
positions per channel of the full map and sums running over kept rows,

    dz = gamma * invstd * (g - sum(g) / n - x_hat * sum(g * x_hat) / n)

is the exact gradient of ``where(keep, bn(z), bn(z).detach())`` at kept rows.
Its values at dropped rows are discarded, which is SBP's definition of the
unit (conv, norm and activation drop the same rows). In eval mode (and with
``norm_eval=True``) the statistics are constants and the formula reduces to
``dz = gamma * invstd * g``. Both use PyTorch's fused BatchNorm kernels; the
train-mode statistics term is one extra fused pass. ``BatchNorm`` is the tail
op (see ``ops.py``) that runs these on packed rows. Under mixed precision ``z``
and ``g`` are half precision while statistics, affine parameters and their
gradients stay fp32 (the kernels' mixed-type mode, as autocast runs BatchNorm).

GroupNorm (``GroupNorm``, the norm of FCOS/ATSS-style heads) is the same with the
statistics of each image and channel group: the sums run over the kept rows of one
image's group, ``n`` is the group's positions on the full map (channels per group
x H x W). Its statistics never depend on the other images, in train and eval mode
alike, so its input gradient always needs the stored rows (no ``exact_input_grad``).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .ops import TailOp


@dataclass(frozen=True)
class NormStats:
    """Statistics a BatchNorm used in one forward pass."""

    mean: Tensor
    var: Tensor
    eps: float
    count: int
    batch_stats: bool

    @classmethod
    def capture(cls, norm: _BatchNorm, z: Tensor) -> 'NormStats':
        """The statistics ``norm`` applies to ``z`` in its current mode."""
        count = z.numel() // z.shape[1]
        if norm.training or norm.running_mean is None:
            # fp32 statistics for half-precision maps, as the BatchNorm kernels keep them
            half = z.dtype in (torch.float16, torch.bfloat16)
            var, mean = torch.var_mean(z.float() if half else z, dim=(0, 2, 3), unbiased=False)
            return cls(mean, var, norm.eps, count, True)
        return cls(norm.running_mean.clone(), norm.running_var.clone(), norm.eps, count, False)


def norm_forward(norm: _BatchNorm, stats: NormStats, z: Tensor) -> Tensor:
    """``norm(z)`` with the statistics of the forward pass."""
    return F.batch_norm(z, stats.mean, stats.var, norm.weight, norm.bias, False, 0.0, stats.eps)


def norm_backward(norm: _BatchNorm, stats: NormStats, z: Tensor,
                  grad: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of the input (at the packed rows), weight and bias."""
    affine = norm.weight is not None
    grad_z, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
        grad, z, norm.weight, stats.mean, stats.var, None, None, False, stats.eps,
        [True, affine, affine])
    if stats.batch_stats:
        if not affine:
            sum_g = grad.sum(dim=(0, 2, 3))
            sum_gx = ((z - stats.mean[:, None, None]) * grad).sum(dim=(0, 2, 3)) * torch.rsqrt(
                stats.var + stats.eps)
        invstd = torch.rsqrt(stats.var + stats.eps)
        scale = invstd if not affine else invstd * norm.weight
        # dz -= scale * (sum_g / n + x_hat * sum_gx / n), x_hat = (z - mean) * invstd
        slope = scale * invstd * sum_gx / stats.count
        shift = scale * sum_g / stats.count - slope * stats.mean
        grad_z = grad_z.addcmul_(z, slope[:, None, None], value=-1).sub_(shift[:, None, None])
    grad_w = sum_gx if affine and norm.weight.requires_grad else None
    grad_b = sum_g if affine and norm.bias.requires_grad else None
    return grad_z, grad_w, grad_b


class _PackedBatchNorm(torch.autograd.Function):
    """BatchNorm on packed rows with the forward's statistics; its backward
    adds the statistics term over the rows it was given (``norm_backward``)."""

    @staticmethod
    def forward(ctx, z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                norm: _BatchNorm, stats: NormStats) -> Tensor:
        ctx.norm, ctx.stats = norm, stats
        ctx.save_for_backward(z)
        with torch.autocast(z.device.type, enabled=False):  # mixed-type kernels, fp32 stats
            return norm_forward(norm, stats, z)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, = ctx.saved_tensors
        grad_z, grad_w, grad_b = norm_backward(ctx.norm, ctx.stats, z, grad.contiguous())
        return grad_z, grad_w, grad_b, None, None


class BatchNorm(TailOp):
    """A BatchNorm layer in a unit's tail (train-mode statistics as above).

    Args:
        norm: a ``_BatchNorm`` (BN; SyncBN in eval mode or with ``norm_eval``).
        where: the layer's name, for errors.
    """

    gives_input_grad = True  # in eval mode: a per-channel scale

    def __init__(self, norm: _BatchNorm, where: str = 'norm') -> None:
        if not isinstance(norm, _BatchNorm):
            raise TypeError(f'{where}: SBP supports BatchNorm (BN/SyncBN in eval) normalisation, '
                            f'got {type(norm).__name__}; use the dense module or a BN norm_cfg')
        self.norm = norm
        self.where = where

    def parameters(self) -> List[Optional[Tensor]]:
        return [self.norm.weight, self.norm.bias]

    def check_call(self) -> None:
        """Refuse what the statistics term cannot do (``TailOp.check_call``)."""
        if isinstance(self.norm, nn.SyncBatchNorm) and self.norm.training:
            raise NotImplementedError(
                f'SBP unit {self.where!r}: SyncBN in train mode is not supported (its '
                'statistics gradient needs a cross-rank reduction); use BN, or '
                'norm_eval=True as the standard COCO configs do')

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        return self.norm(x)

    def forward(self, x: Tensor, other: Optional[Tensor]) -> Tuple[Tensor, NormStats]:
        stats = NormStats.capture(self.norm, x)
        return self.norm(x), stats

    def rows(self, x: Tensor, other: Optional[Tensor], state: NormStats) -> Tensor:
        return _PackedBatchNorm.apply(x, self.norm.weight, self.norm.bias, self.norm, state)

    def check_input_grad(self) -> None:
        if self.norm.training:
            raise TypeError(
                f'{self.where}: exact input gradients need BatchNorm in eval mode, and this '
                'one is in train mode: use norm_eval=True (the COCO practice) or leave '
                'sbp.exact_input_grad off')

    def input_grad(self, grad: Tensor, state: NormStats) -> Tensor:
        """With fixed statistics (eval mode) a per-channel scale (train mode
        would need the normalised map of every row: refused before the run)."""
        assert not state.batch_stats, f'{self.where}: train-mode statistics'
        scale = torch.rsqrt(state.var + state.eps)
        if self.norm.weight is not None:
            scale = scale * self.norm.weight.detach()
        return grad * scale.to(grad.dtype)[:, None, None]


@dataclass(frozen=True)
class GroupStats:
    """Statistics a GroupNorm used in one forward pass: ``(N, G)`` fp32 mean and
    inverse standard deviation, and the positions per group of the full map."""

    mean: Tensor
    rstd: Tensor
    count: int

    @classmethod
    def capture(cls, norm: nn.GroupNorm, z: Tensor) -> 'GroupStats':
        grouped = z.detach().float().reshape(z.shape[0], norm.num_groups, -1)
        var, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
        return cls(mean, torch.rsqrt(var + norm.eps), grouped.shape[-1])


def _normalised(z: Tensor, stats: GroupStats, groups: int) -> Tensor:
    """``x_hat`` of packed rows ``z`` (fp32), shaped ``(N, G, C // G, R, W)``."""
    grouped = z.float().reshape(z.shape[0], groups, -1, *z.shape[2:])
    return (grouped - stats.mean[..., None, None, None]) * stats.rstd[..., None, None, None]


def _per_channel(t: Optional[Tensor], groups: int) -> Optional[Tensor]:
    """A ``(C,)`` affine parameter broadcast against ``(N, G, C // G, R, W)``."""
    return None if t is None else t.float().reshape(1, groups, -1, 1, 1)


class _PackedGroupNorm(torch.autograd.Function):
    """GroupNorm on packed rows with the forward's statistics; its backward adds
    the statistics term over the rows it was given."""

    @staticmethod
    def forward(ctx, z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                norm: nn.GroupNorm, stats: GroupStats, out_dtype: torch.dtype) -> Tensor:
        ctx.norm, ctx.stats = norm, stats
        ctx.save_for_backward(z)
        groups = norm.num_groups
        y = _normalised(z, stats, groups)
        if weight is not None:
            y = y * _per_channel(weight, groups) + _per_channel(bias, groups)
        return y.reshape(z.shape).to(out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, = ctx.saved_tensors
        norm, stats, groups = ctx.norm, ctx.stats, ctx.norm.num_groups
        x_hat = _normalised(z, stats, groups)
        g = grad.float().reshape(x_hat.shape)
        affine = norm.weight is not None
        g_scaled = g * _per_channel(norm.weight, groups) if affine else g
        dims = (2, 3, 4)
        sum_g = g_scaled.sum(dim=dims, keepdim=True)
        sum_gx = (g_scaled * x_hat).sum(dim=dims, keepdim=True)
        rstd = stats.rstd[..., None, None, None]
        grad_z = rstd * (g_scaled - (sum_g + x_hat * sum_gx) / stats.count)
        grad_w = grad_b = None
        if affine and norm.weight.requires_grad:
            grad_w = (g * x_hat).sum(dim=(0, 3, 4)).reshape(-1).to(norm.weight.dtype)
        if affine and norm.bias.requires_grad:
            grad_b = g.sum(dim=(0, 3, 4)).reshape(-1).to(norm.bias.dtype)
        return grad_z.reshape(z.shape).to(z.dtype), grad_w, grad_b, None, None, None


class GroupNorm(TailOp):
    """A GroupNorm layer in a unit's tail (per-image group statistics as above).

    Args:
        norm: an ``nn.GroupNorm``.
        where: the layer's name, for errors.
    """

    def __init__(self, norm: nn.GroupNorm, where: str = 'norm') -> None:
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f'{where}: expected nn.GroupNorm, got {type(norm).__name__}')
        self.norm = norm
        self.where = where

    def parameters(self) -> List[Optional[Tensor]]:
        return [self.norm.weight, self.norm.bias]

    def reference(self, x: Tensor, other: Optional[Tensor]) -> Tensor:
        return self.norm(x)

    def forward(self, x: Tensor, other: Optional[Tensor]) -> Tuple[Tensor, GroupStats]:
        return self.norm(x), GroupStats.capture(self.norm, x)

    def rows(self, x: Tensor, other: Optional[Tensor], state: GroupStats) -> Tensor:
        # autocast runs group_norm in fp32: its output is fp32 under autocast
        autocast = torch.is_autocast_enabled(x.device.type)
        out_dtype = torch.float32 if autocast else x.dtype
        return _PackedGroupNorm.apply(x, self.norm.weight, self.norm.bias, self.norm, state,
                                      out_dtype)


def norm_op(norm: nn.Module, where: str) -> Union[BatchNorm, GroupNorm]:
    """The tail op of a unit's normalisation layer: ``BatchNorm`` or ``GroupNorm``.

    Raises:
        TypeError: for other norms, naming ``where``.
    """
    if isinstance(norm, nn.GroupNorm):
        return GroupNorm(norm, where)
    if not isinstance(norm, _BatchNorm):
        raise TypeError(f'{where}: SBP supports BatchNorm (BN/SyncBN in eval) and GroupNorm '
                        f'normalisation, got {type(norm).__name__}; use the dense module or a '
                        'BN/GN norm_cfg')
    return BatchNorm(norm, where)
