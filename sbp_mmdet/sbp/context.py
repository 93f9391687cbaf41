"""The per-forward SBP context, carried with the feature maps it describes.

An SBP backbone draws the iteration's mask and returns its feature maps as
``SBPFeatures``: the tuple mmdet's modules expect, holding also the iteration
and the stride of each map. An SBP neck reads them from its input and returns
``SBPFeatures`` of its own outputs, an SBP head reads them from the neck's
output. Nothing is looked up in a process-wide table: a module that receives
plain tensors (e.g. behind a dense module that rebuilt the tuple) has no mask
to follow and says so (``SBPModuleMixin.sbp_follow``).
"""
from typing import Iterable, Sequence, Tuple

from torch import Tensor

from .masks import SBPIteration


class SBPFeatures(tuple):
    """Feature maps with the SBP iteration of the forward that produced them.

    Args:
        maps: the feature maps, finest first.
        iteration: the iteration's mask (keep ratio 1.0 when SBP was off).
        strides: the stride (in input pixels) of each map.
    """

    iteration: SBPIteration
    strides: Tuple[int, ...]

    def __new__(cls, maps: Iterable[Tensor], iteration: SBPIteration,
                strides: Sequence[int]) -> 'SBPFeatures':
        features = super().__new__(cls, maps)
        if len(strides) != len(features):
            raise ValueError(f'SBPFeatures: {len(features)} maps but {len(strides)} strides')
        features.iteration = iteration
        features.strides = tuple(int(s) for s in strides)
        return features
