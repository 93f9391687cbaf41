"""Mask policies: how the rows of an iteration's base mask are chosen.

A policy draws the base row mask (at the coarsest SBP stride) of one training
forward from a ``MaskRequest``: one mask shared by the batch, or one per image
(``sbp.per_image=True``) with the same kept count in every image so that packed
tensors stay rectangular. Policies are registered by name
(``register_mask_policy``) and chosen with ``sbp=dict(sampling=<name>)``:

- ``'grid'``: periodic cells of rows, the offset drawn per iteration (and per
  image). The offset comes from a stream that is the same on every rank, and
  rank ``r`` shifts it by ``r`` cells, so distributed ranks keep complementary
  rows: with at least ``grid_period`` ranks every row is kept by some rank.
- ``'random'``: ``round(keep_ratio * rows)`` rows drawn uniformly, from a
  stream of the rank's own (ranks draw independently).
- ``'objects'``: rows that cover a ground-truth box first, the rest filled at
  random to the same count, per image; it needs the batch's boxes before the
  forward (``SBPHook`` hands them to the SBP modules).
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Type

import torch
from torch import Tensor


def grid_period(keep_ratio: float) -> int:
    """Number of cells after which the grid pattern repeats."""
    if keep_ratio >= 1.0:
        return 1
    share = keep_ratio if keep_ratio <= 0.5 else 1.0 - keep_ratio
    return max(2, int(round(1.0 / share)))


def grid_row_mask(num_rows: int, keep_ratio: float, offset: int, cell: int = 1) -> Tensor:
    """Periodic cells of ``cell`` rows: keep 1 cell in ``round(1/r)`` (r <= 0.5)
    or drop 1 in ``round(1/(1-r))`` (r > 0.5), shifted by ``offset`` rows."""
    if keep_ratio >= 1.0:
        return torch.ones(num_rows, dtype=torch.bool)
    phase = ((torch.arange(num_rows) + offset) // cell) % grid_period(keep_ratio)
    return phase == 0 if keep_ratio <= 0.5 else phase != 0


def num_base_rows(image_height: int, base_stride: int) -> int:
    """Rows of the base mask of an input ``image_height`` pixels high."""
    return max(1, math.ceil(image_height / base_stride))


def kept_count(num_rows: int, keep_ratio: float) -> int:
    """Rows a policy without structure keeps: ``round(r * rows)``, at least one."""
    return min(num_rows, max(1, int(round(keep_ratio * num_rows))))


def fill_to_equal_counts(masks: Tensor) -> Tensor:
    """Per-image masks ``(N, rows)`` with rows added, from the bottom up, to the
    images that keep fewer than the most, so that every image keeps as many."""
    most = int(masks.sum(dim=1).max())
    masks = masks.clone()
    for mask in masks:
        missing = most - int(mask.sum())
        if missing:
            mask[torch.nonzero(~mask).flatten()[-missing:]] = True
    return masks


@dataclass(frozen=True)
class MaskRequest:
    """What a policy gets to draw one iteration's base mask.

    Args:
        num_rows: rows of the base mask (``ceil(image height / base_stride)``).
        base_stride: stride (in input pixels) of the base mask.
        keep_ratio: the keep ratio in force, in (0, 1).
        batch_size: images in the batch.
        per_image: draw one mask per image (``sbp.per_image``).
        grid_cell: ``sbp.grid_cell``.
        generator: this rank's stream, a function of (run seed, rank, step).
        shared_generator: a stream equal on every rank, a function of
            (run seed, step): for draws that ranks coordinate.
        rank: this process's distributed rank (0 without DDP).
        world_size: number of ranks (1 without DDP).
        gt_boxes: the batch's ground-truth boxes, one ``(k, 4)`` xyxy tensor in
            input pixels per image, for policies with ``needs_boxes``; None
            otherwise.
    """

    num_rows: int
    base_stride: int
    keep_ratio: float
    batch_size: int
    per_image: bool
    grid_cell: int
    generator: torch.Generator
    shared_generator: torch.Generator
    rank: int = 0
    world_size: int = 1
    gt_boxes: Optional[Sequence[Tensor]] = None

    @property
    def num_masks(self) -> int:
        """Masks to draw: one per image, or one for the batch."""
        return self.batch_size if self.per_image else 1


class MaskPolicy:
    """Base of the mask policies.

    A policy implements ``draw(request)`` and returns a bool tensor of shape
    ``(request.num_masks, request.num_rows)`` whose rows all keep the same
    number of rows (``fill_to_equal_counts`` makes them so). A policy that
    needs the batch's ground-truth boxes sets ``needs_boxes = True``.
    """

    needs_boxes = False

    def draw(self, request: MaskRequest) -> Tensor:
        raise NotImplementedError


MASK_POLICIES: Dict[str, Type[MaskPolicy]] = {}


def register_mask_policy(name: str) -> Callable[[Type[MaskPolicy]], Type[MaskPolicy]]:
    """Class decorator: make a ``MaskPolicy`` available as ``sbp.sampling=name``.

    Raises:
        KeyError: when ``name`` is taken.
    """
    def register(cls: Type[MaskPolicy]) -> Type[MaskPolicy]:
        if name in MASK_POLICIES:
            raise KeyError(f'mask policy {name!r} is already registered '
                           f'({MASK_POLICIES[name].__name__})')
        MASK_POLICIES[name] = cls
        return cls
    return register


def build_mask_policy(name: str) -> MaskPolicy:
    """The registered policy ``name``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    if not isinstance(name, str) or name not in MASK_POLICIES:
        raise ValueError(f'sbp.sampling must be one of the registered mask policies '
                         f'{sorted(MASK_POLICIES)}, got {name!r} (register new ones with '
                         'sbp_mmdet.sbp.register_mask_policy)')
    return MASK_POLICIES[name]()


@register_mask_policy('grid')
class GridPolicy(MaskPolicy):
    """Periodic cells; ranks take complementary offsets (see the module docstring)."""

    def draw(self, request: MaskRequest) -> Tensor:
        cell = request.grid_cell
        cycle = grid_period(request.keep_ratio) * cell
        base = torch.randint(cycle, (request.num_masks,), generator=request.shared_generator)
        offsets = (base + request.rank * cell) % cycle
        masks = torch.stack([grid_row_mask(request.num_rows, request.keep_ratio, int(offset),
                                           cell) for offset in offsets])
        return fill_to_equal_counts(masks)


@register_mask_policy('random')
class RandomPolicy(MaskPolicy):
    """``round(keep_ratio * rows)`` rows drawn uniformly, per rank."""

    def draw(self, request: MaskRequest) -> Tensor:
        count = kept_count(request.num_rows, request.keep_ratio)
        masks = torch.zeros(request.num_masks, request.num_rows, dtype=torch.bool)
        for mask in masks:
            mask[torch.randperm(request.num_rows, generator=request.generator)[:count]] = True
        return masks


@register_mask_policy('objects')
class ObjectsPolicy(MaskPolicy):
    """Rows covering a ground-truth box first, the rest at random, to
    ``round(keep_ratio * rows)`` rows per mask. A shared mask (``per_image``
    False) ranks the rows covering a box of any image first."""

    needs_boxes = True

    def draw(self, request: MaskRequest) -> Tensor:
        if request.gt_boxes is None:
            raise ValueError("sbp.sampling='objects' needs the batch's ground-truth boxes "
                             'before the forward: add SBPHook to custom_hooks (it hands them '
                             'to the SBP backbone), or set them with '
                             'mask_sampler.set_gt_boxes(...)')
        covered = torch.stack([self._covered(boxes, request) for boxes in request.gt_boxes])
        if not request.per_image:
            covered = covered.any(dim=0, keepdim=True)
        count = kept_count(request.num_rows, request.keep_ratio)
        score = torch.rand(covered.shape, generator=request.generator) + covered
        masks = torch.zeros_like(covered)
        masks.scatter_(1, score.topk(count, dim=1).indices, True)
        return masks

    @staticmethod
    def _covered(boxes: Tensor, request: MaskRequest) -> Tensor:
        """Base rows that overlap a box of ``boxes`` (k, 4)."""
        top = torch.arange(request.num_rows, dtype=torch.float32) * request.base_stride
        boxes = boxes.detach().float().cpu().reshape(-1, 4)
        overlap = (top[:, None] < boxes[:, 3]) & (top[:, None] + request.base_stride > boxes[:, 1])
        return overlap.any(dim=1)
