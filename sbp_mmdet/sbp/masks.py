"""Row keep masks: one base mask per iteration, replicated to finer strides.

SBP masks in sbp-mmdet are *row-structured*: a feature-map row is either kept
(its gradients are computed) or dropped, across the full width. Rows make the
halo that a k x k convolution needs around kept outputs cheap (k - 1 rows per
band of kept rows) and let every SBP op run on dense packed bands with the
ordinary convolution kernels, which is what turns the dropped positions into
memory and compute that are really saved.

The base mask lives at the coarsest SBP stride. A row ``i`` of a map at a finer
stride ``s`` covers image rows ``[i * s, (i + 1) * s)`` and is kept when the
base row that covers them is kept, so every SBP layer of the backbone and the
neck drops the same image regions within one iteration.
"""
import math
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .config import SBPConfig
from .rows import gather_rows


def grid_row_mask(num_rows: int, keep_ratio: float, offset: int, cell: int = 1) -> Tensor:
    """Periodic cells of ``cell`` rows: keep 1 cell in ``round(1/r)`` (r <= 0.5)
    or drop 1 in ``round(1/(1-r))`` (r > 0.5), shifted by ``offset`` rows."""
    if keep_ratio >= 1.0:
        return torch.ones(num_rows, dtype=torch.bool)
    phase = ((torch.arange(num_rows) + offset) // cell) % grid_period(keep_ratio)
    return phase == 0 if keep_ratio <= 0.5 else phase != 0


def grid_period(keep_ratio: float) -> int:
    """Number of rows after which the grid pattern repeats."""
    if keep_ratio >= 1.0:
        return 1
    share = keep_ratio if keep_ratio <= 0.5 else 1.0 - keep_ratio
    return max(2, int(round(1.0 / share)))


class RowMaskSampler:
    """Draws the base row mask of each iteration.

    Masks are a pure function of ``(seed, step)``: ``seed`` is a run seed
    plus the distributed rank (every rank drops different rows, so the
    averaged gradient covers more of the image), and ``step`` counts training
    iterations. ``SBPHook`` sets the run seed to the runner's (the one
    mmengine stores in checkpoints and restores on resume) and ``step`` to the
    iteration, so the masks are a function of (run seed, rank, iteration).
    Without the hook the run seed is ``torch.initial_seed()`` at construction.
    """

    def __init__(self, cfg: SBPConfig, seed: Optional[int] = None) -> None:
        self.cfg = cfg
        self.set_seed(torch.initial_seed() if seed is None else seed)
        self.step = 0
        self.keep_ratio = float(cfg.keep_ratio)

    def set_seed(self, run_seed: int) -> None:
        """Draw from ``run_seed`` (the same on every rank) plus this process's rank."""
        self.seed = int(run_seed) + _rank()

    def sample(self, num_rows: int) -> Tensor:
        """The base mask (bool, ``num_rows``) of the current step; advances it."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.step) % (2**63 - 1))
        self.step += 1
        ratio = self.keep_ratio
        if ratio >= 1.0:
            return torch.ones(num_rows, dtype=torch.bool)
        if self.cfg.sampling == 'grid':
            cell = self.cfg.grid_cell
            offset = int(torch.randint(grid_period(ratio) * cell, (1,), generator=gen))
            return grid_row_mask(num_rows, ratio, offset, cell)
        num_kept = min(num_rows, max(1, int(round(ratio * num_rows))))
        mask = torch.zeros(num_rows, dtype=torch.bool)
        mask[torch.randperm(num_rows, generator=gen)[:num_kept]] = True
        return mask

    def state_dict(self) -> dict:
        return dict(seed=self.seed, step=self.step, keep_ratio=self.keep_ratio)

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state['seed']), int(state['step'])
        self.keep_ratio = float(state.get('keep_ratio', self.keep_ratio))


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SBPIteration:
    """The keep mask of one training forward, shared by all SBP layers in it.

    Args:
        base_mask (Tensor): bool mask over the rows of the base stride.
        base_stride (int): stride (in input pixels) of the base mask.
    """

    def __init__(self, base_mask: Tensor, base_stride: int, keep_ratio: Optional[float] = None,
                 sampling: Optional[str] = None) -> None:
        self.base_mask = base_mask.to(torch.bool).cpu()
        self.base_stride = int(base_stride)
        self.keep_ratio = keep_ratio
        self.sampling = sampling
        self._rows: Dict[Tuple[int, int], Tensor] = {}
        self._packs: Dict[int, Dict[int, Tuple[weakref.ref, weakref.ref, Tensor]]] = {}

    @classmethod
    def sample(cls, sampler: RowMaskSampler, image_height: int, base_stride: int) -> 'SBPIteration':
        return cls(sampler.sample(max(1, math.ceil(image_height / base_stride))), base_stride,
                   sampler.keep_ratio, sampler.cfg.sampling)

    @classmethod
    def dense(cls, base_stride: int) -> 'SBPIteration':
        """An iteration that keeps everything (SBP off, e.g. in a dense warm-up)."""
        return cls(torch.ones(1, dtype=torch.bool), base_stride, 1.0)

    def covers(self, stride: int) -> bool:
        """Whether maps at ``stride`` get a mask (strides up to the base one)."""
        return stride <= self.base_stride and self.base_stride % stride == 0

    def kept_rows(self, stride: int, height: int) -> Tensor:
        """Sorted indices (on the CPU) of the kept rows of a map of ``height`` at ``stride``."""
        key = (stride, height)
        rows = self._rows.get(key)
        if rows is None:
            if not self.covers(stride):
                raise ValueError(f'stride {stride} is not covered by the SBP base mask at '
                                 f'stride {self.base_stride}')
            factor = self.base_stride // stride
            base_row = (torch.arange(height) // factor).clamp_(max=len(self.base_mask) - 1)
            rows = torch.nonzero(self.base_mask[base_row]).flatten()
            self._rows[key] = rows
        return rows

    def kept_fraction(self, stride: int, height: int) -> float:
        """Realised fraction of kept rows of a map of ``height`` at ``stride``."""
        return len(self.kept_rows(stride, height)) / max(height, 1)

    def kept_fractions(self) -> Dict[int, float]:
        """Realised kept fraction per stride of the maps SBP used so far."""
        fractions: Dict[int, float] = {}
        for (stride, height), rows in self._rows.items():
            fractions[stride] = len(rows) / max(height, 1)
        return fractions

    def pack(self, tensor: Tensor, rows: Tensor,
             dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """Rows ``rows`` of ``tensor`` in ``dtype``, stored once per feature map.

        Returns ``(data, stored_rows)`` with ``data = tensor[:, :, stored_rows]``
        (cast to ``dtype``, default the tensor's) and ``stored_rows`` a superset
        of ``rows``: when an SBP layer already packed more rows of the same map
        (a block's input with its halo), the next reader (the FPN lateral on the
        same stage output) shares that copy instead of storing its rows again.
        """
        dtype = dtype or tensor.dtype
        for key, (tensor_ref, data_ref, stored_rows) in self._packs.get(id(tensor), {}).items():
            data = data_ref()
            if tensor_ref() is tensor and data is not None and data.dtype == dtype and (
                    stored_rows is rows or torch.isin(rows, stored_rows).all()):
                return data, stored_rows
        data = gather_rows(tensor, rows).to(dtype)
        # The references are weak: the autograd nodes that save ``data`` own
        # it, so it is freed with them after backward.
        self._packs.setdefault(id(tensor), {})[id(rows)] = (
            weakref.ref(tensor), weakref.ref(data), rows)
        return data, rows
