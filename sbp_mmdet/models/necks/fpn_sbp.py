"""FPN with Stochastic Backpropagation on its lateral convs (and optionally its output convs)."""
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple, Union

from mmdet.models.necks import FPN
from mmdet.registry import MODELS
from torch import Tensor, nn

from ...sbp import SBPConfig, SBPFeatures, SBPIteration, SBPModuleMixin
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
            ``convs`` (sequence of ``'lateral'``/``'output'``, default
            ``('lateral',)``): which convs train with SBP; the others run
            densely (a dense lateral stores its backbone map in full, a dense
            output conv its merged map). The default keeps the output convs
            dense: with SBP there they cut the top-down gradient into the
            backbone's dense last stage, which cost accuracy for a little
            memory (docs/accuracy.md, docs/memory.md).
            ``exact_input_grad`` (bool, or a sequence of groups among
            ``convs``; default False): SBP on those convs' weight gradients
            only (True: every SBP group; see ``SBPConfig``). Their input
            gets the exact gradient of every row, computed from the weights
            (no stored activations), so they store what SBP stores without
            cutting the gradient path into the top-down path and backbone.
            Default: None.
        *args, **kwargs: the arguments of ``mmdet.models.FPN``, positional ones in
            its order (``sbp`` is keyword-only).
    """

    sbp_extra_keys = ('own_mask', 'convs', 'exact_input_grad')

    def __init__(self, *args, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extra = self.init_sbp(sbp, self.sbp_extra_keys)
        self.own_mask = bool(extra.get('own_mask', False))
        convs = extra.get('convs', DEFAULT_CONVS)
        self.sbp_conv_groups = self._conv_groups(convs)
        self.sbp_exact_groups = self._exact_input_groups(extra.get('exact_input_grad', ()),
                                                         convs)
        self._exact_cfg = replace(self.sbp_cfg, exact_input_grad=True)
        for kind in self.sbp_conv_groups:
            for i, module in enumerate(getattr(self, kind)):
                where = f'{self.sbp_name}.{kind}.{i}'
                program = SBPConvModule.adopt(module, where).sbp_program()
                if kind in self.sbp_exact_groups:
                    program.check_exact_input_grad()

    def sbp_layer_cfg(self, layer: nn.Module) -> SBPConfig:
        """The module's settings, with ``exact_input_grad`` for the groups it names."""
        exact = any(layer is module for kind in self.sbp_exact_groups
                    for module in getattr(self, kind))
        return self._exact_cfg if exact else self.sbp_cfg

    def _conv_groups(self, convs: Sequence[str]) -> Tuple[str, ...]:
        """The attribute names of the conv groups ``sbp.convs`` asks SBP on."""
        if isinstance(convs, str) or not all(c in CONV_GROUPS for c in convs) or not convs:
            raise ValueError(f'{self.sbp_name}: sbp.convs must be a non-empty sequence of '
                             f'{tuple(CONV_GROUPS)}, got {convs!r} (for a dense neck use FPN)')
        return tuple(CONV_GROUPS[c] for c in CONV_GROUPS if c in convs)

    def _exact_input_groups(self, exact: Union[bool, Sequence[str]],
                            convs: Sequence[str]) -> Tuple[str, ...]:
        """The attribute names of the groups ``sbp.exact_input_grad`` names."""
        if isinstance(exact, bool):
            exact = tuple(convs) if exact else ()
        if isinstance(exact, str) or not all(c in convs for c in exact):
            raise ValueError(f'{self.sbp_name}: sbp.exact_input_grad must be True, False or a '
                             f'sequence of conv groups that sbp.convs={tuple(convs)!r} puts '
                             f'in SBP, got {exact!r}')
        return tuple(CONV_GROUPS[c] for c in exact)

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
