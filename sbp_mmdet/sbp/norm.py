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
``dz = gamma * invstd * g``.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class NormStats:
    """Statistics a BatchNorm used in one forward pass."""

    mean: Tensor
    invstd: Tensor
    count: int
    batch_stats: bool

    @classmethod
    def capture(cls, norm: _BatchNorm, z: Tensor) -> 'NormStats':
        """The statistics ``norm`` applies to ``z`` in its current mode."""
        if norm.training or norm.running_mean is None:
            var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
            return cls(mean, torch.rsqrt(var + norm.eps), z.numel() // z.shape[1], True)
        return cls(norm.running_mean.clone(), torch.rsqrt(norm.running_var + norm.eps),
                   z.numel() // z.shape[1], False)

    def normalise(self, z: Tensor) -> Tensor:
        return (z - self.mean[:, None, None]) * self.invstd[:, None, None]


def norm_forward(norm: _BatchNorm, stats: NormStats, z: Tensor) -> Tensor:
    """``norm(z)`` with the statistics of the forward pass."""
    out = stats.normalise(z)
    if norm.weight is not None:
        out = out * norm.weight[:, None, None] + norm.bias[:, None, None]
    return out


def norm_backward(norm: _BatchNorm, stats: NormStats, z: Tensor,
                  grad: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of the input (at the packed rows), weight and bias."""
    x_hat = stats.normalise(z)
    sum_g = grad.sum(dim=(0, 2, 3))
    sum_gx = (grad * x_hat).sum(dim=(0, 2, 3))
    scale = stats.invstd if norm.weight is None else stats.invstd * norm.weight
    if stats.batch_stats:
        grad_z = (grad - (sum_g / stats.count)[:, None, None]
                  - x_hat * (sum_gx / stats.count)[:, None, None]) * scale[:, None, None]
    else:
        grad_z = grad * scale[:, None, None]
    affine = norm.weight is not None
    grad_w = sum_gx if affine and norm.weight.requires_grad else None
    grad_b = sum_g if affine and norm.bias.requires_grad else None
    return grad_z, grad_w, grad_b
