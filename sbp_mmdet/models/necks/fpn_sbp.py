"""FPN with Stochastic Backpropagation on its lateral and output convs."""
from typing import List, Optional, Sequence, Tuple

from mmdet.models.necks import FPN
from mmdet.registry import MODELS
from torch import Tensor

from ...sbp import SBPFeatures, SBPIteration, SBPModuleMixin
from ..layers import SBPConvModule


@MODELS.register_module()
class FPNSBP(SBPModuleMixin, FPN):
    """FPN whose lateral and output convs train with Stochastic Backpropagation.

    A drop-in replacement for mmdet's ``FPN``: same arguments, same
    ``state_dict`` keys, identical outputs. It follows the mask of the SBP
    backbone before it (the ``SBPFeatures`` it returns), so the neck drops the
    same image regions as the backbone, and returns ``SBPFeatures`` with its
    output strides for SBP heads. Levels coarser than the mask's base stride
    (e.g. P5 when the backbone's last stage is dense, and the extra levels) run
    densely: they hold a few percent of the activations. SBP is off in eval
    mode and under ``torch.no_grad()``.

    Args:
        sbp (dict, optional): SBP settings: ``keep_ratio``, ``sampling``,
            ``per_image``, ``grid_cell``, ``grad_scale``, ``recompute`` (see
            ``ResNetSBP``) and ``own_mask`` (bool, default False). The
            backbone's mask is used (its keep ratio, sampling, per-image masks
            and grid cell): ``keep_ratio``/``sampling``/``per_image`` given
            here must agree with the backbone's, and a disagreement is
            refused when the run starts (``sbp_model_problem``). Behind a
            backbone that returns no mask (a dense one) the neck raises an
            error, unless ``own_mask=True``: then it draws its own mask with its
            own settings, at strides relative to its first input (1, 2, 4, ...).
            Default: None.
        **kwargs: the arguments of ``mmdet.models.FPN``.
    """

    def __init__(self, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.own_mask = bool(self.init_sbp(sbp, ('own_mask',)).get('own_mask', False))
        for kind in ('lateral_convs', 'fpn_convs'):
            for i, module in enumerate(getattr(self, kind)):
                SBPConvModule.adopt(module, f'{self.sbp_name}.{kind}.{i}')

    def forward(self, inputs: Tuple[Tensor]) -> tuple:
        if not self.sbp_training():
            return super().forward(inputs)
        iteration, strides = self._mask(inputs)
        with self.sbp_layers(iteration, self._layers(strides)):
            outs = super().forward(inputs)
        return SBPFeatures(outs, iteration, self._out_strides(strides))

    def _mask(self, inputs: Sequence[Tensor]) -> Tuple[SBPIteration, List[int]]:
        """The iteration and input strides: the backbone's, or its own mask."""
        if self.own_mask and not isinstance(inputs, SBPFeatures):
            strides = [2**i for i in range(len(inputs))]
            top = strides[self.backbone_end_level - 1]
            return self.sbp_draw(inputs[0].shape[2], top, batch_size=inputs[0].shape[0]), strides
        features = self.sbp_follow(inputs)
        strides = list(features.strides)
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f'{self.sbp_name}: input strides {strides} do not double from '
                             'level to level as FPN assumes')
        return features.iteration, strides

    def _out_strides(self, strides: List[int]) -> List[int]:
        first = strides[self.start_level]
        return [first * 2**i for i in range(self.num_outs)]

    def _layers(self, strides: List[int]) -> list:
        """(conv module, input stride) of every lateral and output conv."""
        level_strides = strides[self.start_level:self.backbone_end_level]
        layers = list(zip(self.lateral_convs, level_strides))
        layers += list(zip(self.fpn_convs, level_strides))
        extra_stride = {'on_input': strides[self.backbone_end_level - 1]}.get(
            self.add_extra_convs, level_strides[-1])
        for module in list(self.fpn_convs)[len(level_strides):]:
            layers.append((module, extra_stride))
            extra_stride *= 2
        return layers
