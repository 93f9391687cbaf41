"""Gradient fidelity: how close SBP's parameter gradients are to plain backprop's.

At fixed weights and on the same batch, the dense gradient (keep ratio 1.0)
and the SBP gradient at keep ratio ``r`` are compared per parameter group
(backbone stem and stages, neck, heads) by cosine similarity and norm ratio
``|g_sbp| / |g_dense|``. The RPN/RoI samplers draw from the global generator,
which is reseeded before each pass so that both passes sample the same
anchors and proposals; SBP's mask follows the iteration index.
"""
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .hooks import SBPHook
from .variants import parse_variant

BACKBONE_STEM = ('conv1', 'bn1', 'stem')


def parameter_group(name: str, split_heads: bool = False) -> str:
    """The group of a detector parameter: ``backbone.layer2``, ``neck``, ``rpn_head``...;
    with ``split_heads`` a head's layers are groups of their own (``bbox_head.cls_convs``,
    ``bbox_head.retina_cls``...)."""
    parts = name.split('.')
    if parts[0] == 'backbone' and len(parts) > 2:
        return 'backbone.stem' if parts[1] in BACKBONE_STEM else f'backbone.{parts[1]}'
    if split_heads and parts[0].endswith('_head') and len(parts) > 2:
        return f'{parts[0]}.{parts[1]}'
    return parts[0]


def group_gradients(model: nn.Module, split_heads: bool = False) -> Dict[str, Tensor]:
    """The parameter gradients of ``model`` concatenated per group (fp64)."""
    chunks: Dict[str, List[Tensor]] = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:  # a parameter this loss does not reach counts as zero
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            chunks[parameter_group(name, split_heads)].append(grad.detach().double().flatten())
    return {group: torch.cat(parts) for group, parts in chunks.items()}


def compare_gradients(reference: Dict[str, Tensor],
                      other: Dict[str, Tensor]) -> Dict[str, Dict[str, float]]:
    """Cosine similarity and norm ratio of ``other`` to ``reference`` per group."""
    out = {}
    for group, ref in reference.items():
        grad = other.get(group, torch.zeros_like(ref))
        ref_norm, norm = float(ref.norm()), float(grad.norm())
        if ref_norm == 0.0:
            continue  # the group gets no gradient from this batch: nothing to compare
        cosine = float(torch.dot(ref, grad)) / (ref_norm * norm) if norm else 0.0
        out[group] = dict(cosine=cosine, norm_ratio=norm / ref_norm)
    return out


def fidelity_variants(names: Sequence[str], model: Optional[Mapping] = None
                      ) -> Tuple[List[float], Dict[str, Any]]:
    """The keep ratios of the SBP variants ``names`` (docs/usage.md#variants) and the
    config options they share, e.g. ``sbp@0.25:neck=both sbp@0.5:neck=both``: one model
    measures them all, so they may differ in keep ratio only, and only model options
    apply (the gradients are compared in fp32 at fixed weights)."""
    variants = [parse_variant(name, model) for name in names]
    for variant in variants:
        if not variant.sbp or variant.keep_ratio >= 1.0:
            raise ValueError(f'variant {variant.name!r}: gradient fidelity compares sbp@R '
                             'variants, R in (0, 1), with dense (keep ratio 1.0)')
        if variant.tokens != variants[0].tokens:
            raise ValueError(f'variants {variants[0].name!r} and {variant.name!r} differ in '
                             'more than the keep ratio: one model measures them all')
        other = [key for key in variant.options if not key.startswith('model.')]
        if other:
            raise ValueError(f'variant {variant.name!r} sets {", ".join(other)}: gradient '
                             'fidelity applies model options only (fp32, fixed weights)')
    options = {key: value for key, value in variants[0].options.items()
               if key != 'model.backbone.sbp.keep_ratio'}
    return [variant.keep_ratio for variant in variants], options


def gradients_at(model: nn.Module, data: dict, keep_ratio: float, step: int,
                 seed: int, split_heads: bool = False) -> Dict[str, Tensor]:
    """Group gradients of one train-mode loss at ``keep_ratio`` on ``data``."""
    for module in SBPHook.sbp_modules(model):
        module.keep_ratio = keep_ratio
        module.mask_sampler.step = step
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    loss.backward()
    return group_gradients(model, split_heads)


def gradient_fidelity(model: nn.Module, batches: Iterable[dict], keep_ratios: Sequence[float],
                      seed: int = 0, on_batch=None, split_heads: bool = False
                      ) -> Dict[float, Dict[str, Dict[str, float]]]:
    """Mean cosine and norm ratio to the dense gradient per keep ratio and group.

    Args:
        model: a detector with SBP modules, in train mode.
        batches: preprocessed batches (``data_preprocessor(batch, True)`` outputs).
        keep_ratios: the SBP keep ratios to compare with keep ratio 1.0.
        seed: seeds the samplers of batch ``i`` with ``seed + i``.
        on_batch: called after each batch (progress).
        split_heads: one group per head layer instead of one per head.
    """
    if not SBPHook.sbp_modules(model):
        raise ValueError('gradient fidelity needs a detector with SBP modules '
                         '(ResNetSBP/FPNSBP)')
    sums: Dict[float, Dict[str, Dict[str, float]]] = {r: {} for r in keep_ratios}
    for step, data in enumerate(batches):
        dense = gradients_at(model, data, 1.0, step, seed + step, split_heads)
        for ratio in keep_ratios:
            sbp = gradients_at(model, data, ratio, step, seed + step, split_heads)
            for group, stats in compare_gradients(dense, sbp).items():
                total = sums[ratio].setdefault(group, dict(cosine=0.0, norm_ratio=0.0, n=0))
                total['cosine'] += stats['cosine']
                total['norm_ratio'] += stats['norm_ratio']
                total['n'] += 1
        if on_batch is not None:
            on_batch()
    order = list(dict.fromkeys(parameter_group(name, split_heads)
                               for name, _ in model.named_parameters()))
    if not any(sums.values()):
        raise ValueError('gradient fidelity needs at least one batch with a gradient')
    return {r: {g: dict(cosine=groups[g]['cosine'] / groups[g]['n'],
                        norm_ratio=groups[g]['norm_ratio'] / groups[g]['n'])
                for g in order if g in groups}
            for r, groups in sums.items()}
