"""BatchNorm forward and backward on packed rows, with full-map statistics.

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
train-mode statistics term is one extra fused pass. Under mixed precision ``z``
and ``g`` are half precision while statistics, affine parameters and their
gradients stay fp32 (the kernels' mixed-type mode, as autocast runs BatchNorm).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


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
