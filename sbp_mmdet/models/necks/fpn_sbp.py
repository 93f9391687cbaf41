"""FPN with Stochastic Backpropagation on its lateral convs (and optionally its output convs)."""
from typing import List, Optional, Sequence, Tuple

from mmdet.models.necks import FPN
from mmdet.registry import MODELS
from torch import Tensor

from ...sbp import SBPFeatures, SBPIteration, SBPModuleMixin
from ..layers import SBPConvModule
from ..sbp_types import supported_backbones

CONV_GROUPS = {'lateral': 'lateral_convs', 'output': 'fpn_convs'}
# SBP on the laterals only: SBP on the output convs cuts the top-down gradient into the
# dense last stage, which cost accuracy (docs/accuracy.md, docs/gradient_fidelity.md).
DEFAULT_CONVS = ('lateral',)


@MODELS.register_module()
class FPNSBP(SBPModuleMixin, FPN):
    """FPN whose lateral convs (by default) train with Stochastic Backpropagation.

    A drop-in replacement for mmdet's ``FPN``: same arguments, same
    ``state_dict`` keys, identical outputs. It follows the mask of the SBP
    backbone before it (the ``SBPFeatures`` it returns), so the neck drops the
    same image regions as the backbone, and returns ``SBPFeatures`` with its
    output strides for SBP heads. Levels coarser than the mask's base stride
    (e.g. P5 when the backbone's last stage is dense, and the extra levels) run
    densely: they hold a few percent of the activations. SBP is off in eval
    mode and under ``torch.no_grad()``.

    Args:
        sbp (dict, optional): SBP settings. Keys:

            - ``grad_scale``, ``recompute``, ``exact_input_grad``: the layer
              keys (see ``ResNetSBP``), for every SBP conv. With
              ``exact_input_grad`` an SBP conv's input gets the exact
              gradient of every row, computed from the weights (no stored
              activations): it stores what SBP stores without cutting the
              gradient path into the top-down path and the backbone.
            - ``overrides`` (dict): the layer keys of one conv group,
              ``'lateral'`` or ``'output'``, over the module's: e.g.
              ``overrides=dict(output=dict(exact_input_grad=True))``.
            - ``convs`` (sequence of ``'lateral'``/``'output'``, default
              ``('lateral',)``): which convs train with SBP; the others run
              densely (a dense lateral stores its backbone map in full, a
              dense output conv its merged map). The default keeps the
              output convs dense: with SBP there they cut the top-down
              gradient into the backbone's dense last stage, which cost
              accuracy for a little memory (docs/accuracy.md, docs/memory.md).
            - ``own_mask`` (bool, default False): the neck follows the
              backbone's mask, and its mask keys (``keep_ratio``,
              ``sampling``, ``per_image``, ``grid_cell``) are the
              backbone's: given here they are refused. Behind a dense
              backbone (no mask to follow) set ``own_mask=True``: the neck
              then draws its own mask, takes the mask keys, and its strides
              are relative to its first input (1, 2, 4, ...).

            Default: None.
        *args, **kwargs: the arguments of ``mmdet.models.FPN``, positional ones in
            its order (``sbp`` is keyword-only).
    """

    def __init__(self, *args, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.own_mask = (sbp or {}).get('own_mask', False)
        if not isinstance(self.own_mask, bool):
            raise TypeError(f'{self.sbp_name}: sbp.own_mask must be True or False, '
                            f'got {self.own_mask!r}')
        extra = self.init_sbp(sbp, draws_mask=self.own_mask, groups=tuple(CONV_GROUPS),
                              extra_keys=('own_mask', 'convs'),
                              mask_home='the backbone (or this neck, with sbp.own_mask=True)')
        convs = extra.get('convs', DEFAULT_CONVS)
        self.sbp_conv_groups = self._conv_groups(convs)
        dense = sorted(set((sbp or {}).get('overrides') or {}) - set(convs))
        if dense:
            raise ValueError(f'{self.sbp_name}: sbp.overrides sets {dense}, which run densely '
                             f'(sbp.convs={tuple(convs)!r}); add them to sbp.convs or drop '
                             'their settings')
        for group in convs:
            for i, module in enumerate(getattr(self, CONV_GROUPS[group])):
                self.sbp_adopt(module, (SBPConvModule,), f'{CONV_GROUPS[group]}.{i}', group)

    def _conv_groups(self, convs: Sequence[str]) -> Tuple[str, ...]:
        """The attribute names of the conv groups ``sbp.convs`` asks SBP on."""
        if isinstance(convs, str) or not all(c in CONV_GROUPS for c in convs) or not convs:
            raise ValueError(f'{self.sbp_name}: sbp.convs must be a non-empty sequence of '
                             f'{tuple(CONV_GROUPS)}, got {convs!r} (for a dense neck use FPN)')
        return tuple(CONV_GROUPS[c] for c in CONV_GROUPS if c in convs)

    def forward(self, inputs: Tuple[Tensor]) -> tuple:
        if not self.sbp_training():
            return super().forward(inputs)
        iteration, strides = self._mask(inputs)
        with self.sbp_layers(iteration, self._layers(strides)):
            outs = super().forward(inputs)
        return SBPFeatures(outs, iteration, self._out_strides(strides))

    def _mask(self, inputs: Sequence[Tensor]) -> Tuple[SBPIteration, List[int]]:
        """The iteration and input strides: the backbone's, or its own mask."""
        if self.own_mask:
            if isinstance(inputs, SBPFeatures):
                raise ValueError(f'{self.sbp_name}: sbp.own_mask=True, but its inputs carry the '
                                 "mask of an SBP backbone, which the neck follows: drop own_mask "
                                 "and its mask keys (set them in the backbone's sbp)")
            strides = [2**i for i in range(len(inputs))]
            top = strides[self.backbone_end_level - 1]
            return self.sbp_draw(inputs[0].shape[2], top, batch_size=inputs[0].shape[0]), strides
        features = self.sbp_follow(inputs)
        strides = list(features.strides)
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f'{self.sbp_name}: input strides {strides} do not double from '
                             'level to level as FPN assumes')
        return features.iteration, strides

    def sbp_follow(self, inputs: Sequence) -> SBPFeatures:
        if not isinstance(inputs, SBPFeatures):
            raise ValueError(
                f'{self.sbp_name}: its inputs carry no SBP mask (they are a '
                f'{type(inputs).__name__}, not SBPFeatures): the backbone before it must be an '
                f'SBP backbone (mmdet type -> SBP type: {supported_backbones()}) with nothing '
                'in between that rebuilds the feature tuple; behind a backbone without an SBP '
                'version use FPN, or FPNSBP with sbp.own_mask=True')
        return super().sbp_follow(inputs)

    def _out_strides(self, strides: List[int]) -> List[int]:
        first = strides[self.start_level]
        return [first * 2**i for i in range(self.num_outs)]

    def _layers(self, strides: List[int]) -> list:
        """(conv module, input stride) of the SBP lateral and output convs."""
        level_strides = strides[self.start_level:self.backbone_end_level]
        layers = []
        if 'lateral_convs' in self.sbp_conv_groups:
            layers += list(zip(self.lateral_convs, level_strides))
        if 'fpn_convs' in self.sbp_conv_groups:
            layers += list(zip(self.fpn_convs, level_strides))
            extra_stride = {'on_input': strides[self.backbone_end_level - 1]}.get(
                self.add_extra_convs, level_strides[-1])
            for module in list(self.fpn_convs)[len(level_strides):]:
                layers.append((module, extra_stride))
                extra_stride *= 2
        return layers
