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
neck drops the same image regions within one iteration. With
``sbp.per_image`` every image of the batch has its own base mask, all keeping
the same number of rows, so that packed rows stay rectangular ``(N, C, k, W)``:
row sets are then ``(N, k)`` tensors, one sorted row list per image.
"""
import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import MaskConfig
from .index_cache import memoised
from .policies import MaskRequest, build_mask_policy, grid_period, grid_row_mask, num_base_rows
from .rows import contains_rows, gather_rows, stack_rows

__all__ = ['RowMaskSampler', 'SBPIteration', 'grid_period', 'grid_row_mask']


@memoised
def _kept_rows(base_mask: Tensor, factor: int, height: int) -> Tensor:
    """``SBPIteration.kept_rows`` of a map ``factor`` times finer than the base."""
    base_row = (torch.arange(height) // factor).clamp_(max=base_mask.shape[-1] - 1)
    keep = base_mask[..., base_row]
    if keep.dim() == 1:
        return torch.nonzero(keep).flatten()
    return stack_rows([torch.nonzero(k).flatten() for k in keep], height)


class RowMaskSampler:
    """Draws the base row mask of each iteration with the configured policy.

    Masks are a pure function of (run seed, rank, step): ``step`` counts
    training iterations, and the policy draws from two streams, one of the
    rank's own (seeded from run seed + rank and step: ranks draw different
    random rows) and one shared by all ranks (seeded from run seed and step:
    ranks coordinate, e.g. ``'grid'`` takes complementary offsets).
    ``SBPHook`` sets the run seed to the runner's (the one mmengine stores in
    checkpoints and restores on resume) and ``step`` to the iteration. Without
    the hook the run seed is ``torch.initial_seed()`` at construction.
    """

    def __init__(self, cfg: MaskConfig, seed: Optional[int] = None) -> None:
        self.cfg = cfg
        self.policy = build_mask_policy(cfg.sampling)
        self.set_seed(torch.initial_seed() if seed is None else seed)
        self.step = 0
        self.keep_ratio = float(cfg.keep_ratio)
        self.gt_boxes: Optional[Sequence[Tensor]] = None

    def set_seed(self, run_seed: int, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        """Draw from ``run_seed`` (the same on every rank) and the rank: this
        process's distributed rank and world size unless given."""
        dist_rank, dist_world_size = _dist_info()
        self.rank = dist_rank if rank is None else int(rank)
        self.world_size = dist_world_size if world_size is None else int(world_size)
        self.run_seed = int(run_seed)
        self.seed = self.run_seed + self.rank

    def set_gt_boxes(self, boxes: Optional[Sequence[Tensor]]) -> None:
        """The next batch's ground-truth boxes (one (k, 4) xyxy tensor per image,
        input pixels), for policies that need them; used by the next draw only."""
        self.gt_boxes = None if boxes is None else list(boxes)

    def sample(self, num_rows: int, batch_size: int = 1, base_stride: int = 1) -> Tensor:
        """The base mask of the current step; advances it.

        Returns a bool tensor: ``(num_rows,)``, or ``(batch_size, num_rows)``
        with ``sbp.per_image``.

        Raises:
            ValueError: when a per-image policy keeps different counts per image.
        """
        step = self.step
        self.step += 1
        boxes, self.gt_boxes = self.gt_boxes, None
        if self.keep_ratio >= 1.0:
            masks = torch.ones(batch_size if self.cfg.per_image else 1, num_rows,
                               dtype=torch.bool)
        else:
            masks = self.policy.draw(MaskRequest(
                num_rows, base_stride, self.keep_ratio, batch_size, self.cfg.per_image,
                self.cfg.grid_cell, _generator(self.seed, step), _generator(self.run_seed, step),
                self.rank, self.world_size, boxes))
        expected = (batch_size if self.cfg.per_image else 1, num_rows)
        if tuple(masks.shape) != expected:
            raise ValueError(f'mask policy {self.cfg.sampling!r} drew masks of shape '
                             f'{tuple(masks.shape)}, expected {expected}')
        counts = masks.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f'mask policy {self.cfg.sampling!r} kept {counts.tolist()} rows '
                             'per image; per-image masks must keep the same count in every '
                             'image (fill_to_equal_counts makes them so)')
        return masks.to(torch.bool) if self.cfg.per_image else masks[0].to(torch.bool)

    def state_dict(self) -> dict:
        return dict(seed=self.seed, step=self.step, keep_ratio=self.keep_ratio)

    def load_state_dict(self, state: dict) -> None:
        self.set_seed(int(state['seed']) - self.rank, self.rank, self.world_size)
        self.step = int(state['step'])
        self.keep_ratio = float(state.get('keep_ratio', self.keep_ratio))


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def _dist_info() -> Tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SBPIteration:
    """The keep mask of one training forward, shared by all SBP layers in it.

    Args:
        base_mask (Tensor): bool mask over the rows of the base stride:
            ``(rows,)`` shared by the batch, or ``(N, rows)`` per image (every
            image keeping the same count).
        base_stride (int): stride (in input pixels) of the base mask.
        keep_ratio (float, optional): the keep ratio it was drawn with.
        sampling (str, optional): the policy that drew it.
    """

    def __init__(self, base_mask: Tensor, base_stride: int, keep_ratio: Optional[float] = None,
                 sampling: Optional[str] = None) -> None:
        self.base_mask = base_mask.to(torch.bool).cpu().clone()  # ours: never written
        self.base_stride = int(base_stride)
        self.keep_ratio = keep_ratio
        self.sampling = sampling
        self._rows: Dict[Tuple[int, int], Tensor] = {}
        self._packs: Dict[int, Dict[int, Tuple[weakref.ref, weakref.ref, Tensor]]] = {}

    @property
    def per_image(self) -> bool:
        """Whether every image has its own mask (row sets are ``(N, k)``)."""
        return self.base_mask.dim() == 2

    @classmethod
    def sample(cls, sampler: RowMaskSampler, image_height: int, base_stride: int,
               batch_size: int = 1) -> 'SBPIteration':
        mask = sampler.sample(num_base_rows(image_height, base_stride), batch_size, base_stride)
        return cls(mask, base_stride, sampler.keep_ratio, sampler.cfg.sampling)

    @classmethod
    def dense(cls, base_stride: int) -> 'SBPIteration':
        """An iteration that keeps everything (SBP off, e.g. in a dense warm-up)."""
        return cls(torch.ones(1, dtype=torch.bool), base_stride, 1.0)

    def covers(self, stride: int) -> bool:
        """Whether maps at ``stride`` get a mask (strides up to the base one)."""
        return stride <= self.base_stride and self.base_stride % stride == 0

    def kept_rows(self, stride: int, height: int) -> Tensor:
        """Sorted indices (on the CPU) of the kept rows of a map of ``height`` at
        ``stride``: ``(k,)``, or ``(N, k)`` per image. Where the map's last base
        row is cut short (heights that are not a multiple of the base), images
        that keep fewer rows get rows added from the bottom up (``stack_rows``)."""
        key = (stride, height)
        rows = self._rows.get(key)
        if rows is None:
            if not self.covers(stride):
                raise ValueError(f'stride {stride} is not covered by the SBP base mask at '
                                 f'stride {self.base_stride}')
            rows = self._rows[key] = _kept_rows(self.base_mask, self.base_stride // stride,
                                                height)
        return rows

    def kept_fraction(self, stride: int, height: int) -> float:
        """Realised fraction of kept rows of a map of ``height`` at ``stride``."""
        return self.kept_rows(stride, height).shape[-1] / max(height, 1)

    def kept_fractions(self) -> Dict[int, float]:
        """Realised kept fraction per stride of the maps SBP used so far."""
        fractions: Dict[int, float] = {}
        for (stride, height), rows in self._rows.items():
            fractions[stride] = rows.shape[-1] / max(height, 1)
        return fractions

    def pack(self, tensor: Tensor, rows: Tensor,
             dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """Rows ``rows`` of ``tensor`` in ``dtype``, stored once per feature map.

        Returns ``(data, stored_rows)`` with ``data = tensor[:, :, stored_rows]``
        (per image for ``(N, k)`` rows; cast to ``dtype``, default the
        tensor's) and ``stored_rows`` a superset of ``rows``: when an SBP layer
        already packed more rows of the same map (a block's input with its
        halo), the next reader (the FPN lateral on the same stage output)
        shares that copy instead of storing its rows again.
        """
        dtype = dtype or tensor.dtype
        for key, (tensor_ref, data_ref, stored_rows) in self._packs.get(id(tensor), {}).items():
            data = data_ref()
            if tensor_ref() is tensor and data is not None and data.dtype == dtype and (
                    stored_rows is rows or contains_rows(stored_rows, rows)):
                return data, stored_rows
        data = gather_rows(tensor, rows).to(dtype)
        # The references are weak: the autograd nodes that save ``data`` own
        # it, so it is freed with them after backward.
        self._packs.setdefault(id(tensor), {})[id(rows)] = (
            weakref.ref(tensor), weakref.ref(data), rows)
        return data, rows
