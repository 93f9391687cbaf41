"""FPN with Stochastic Backpropagation on its lateral and output convs."""
from typing import List, Optional, Sequence, Tuple

import torch
from mmcv.cnn import ConvModule
from mmdet.models.necks import FPN
from mmdet.registry import MODELS
from torch import Tensor, nn

from ...sbp import (ConvUnit, RowMaskSampler, SBPConfig, SBPIteration, SBPProgram, SBPState,
                    check_unit_layers)
from ...sbp.state import SBPModuleMixin, sbp_states
from ..checks import SHARED_KEYS, neck_disagreement


class SBPConvModule(ConvModule):
    """``ConvModule`` that runs as an SBP unit while ``sbp_state`` is set.

    Supports the order conv -> norm -> act with a plain conv, an optional
    BatchNorm and an optional ReLU.
    """

    sbp_state: Optional[SBPState] = None

    @classmethod
    def adopt(cls, module: ConvModule, where: str) -> 'SBPConvModule':
        """Turn a built ``ConvModule`` into this class in place (same weights)."""
        if type(module) is not ConvModule:
            raise TypeError(f'{where}: expected a ConvModule, got {type(module).__name__}')
        module.__class__ = cls
        module.sbp_program(where)  # fail at build time on unsupported layers
        return module

    def sbp_program(self, where: str = 'SBPConvModule') -> SBPProgram:
        """The layer as an SBP unit; ``where`` names it in errors."""
        if self.order != ('conv', 'norm', 'act') or self.with_explicit_padding:
            raise TypeError(f'{where}: SBP needs order conv-norm-act and zero padding')
        if self.with_activation and not isinstance(self.activate, nn.ReLU):
            raise TypeError(f'{where}: SBP supports ReLU activations only, '
                            f'got {type(self.activate).__name__}')
        norm = self.norm if self.with_norm else None
        check_unit_layers(self.conv, norm, where)
        return SBPProgram([ConvUnit('conv', 'input', self.conv, norm, relu=self.with_activation)])

    def forward(self, x: Tensor, activate: bool = True, norm: bool = True) -> Tensor:
        if self.sbp_state is None or not (activate and norm):
            return super().forward(x, activate, norm)
        return self.sbp_state.run(self.sbp_program(), x)


@MODELS.register_module()
class FPNSBP(SBPModuleMixin, FPN):
    """FPN whose lateral and output convs train with Stochastic Backpropagation.

    A drop-in replacement for mmdet's ``FPN``: same arguments, same
    ``state_dict`` keys, identical outputs. Behind an SBP backbone
    (``ResNetSBP``) it uses the backbone's mask of the same iteration, so the
    neck drops the same image regions as the backbone; behind a dense backbone
    it draws its own mask. Levels coarser than the mask's base stride (e.g.
    P5 when the backbone's last stage is dense, and the extra levels) run
    densely: they hold a few percent of the activations. SBP is off in eval
    mode and under ``torch.no_grad()``.

    Args:
        sbp (dict, optional): SBP settings: ``keep_ratio``, ``sampling``,
            ``grid_cell``, ``grad_scale``, ``recompute`` (see ``ResNetSBP``).
            Behind an SBP backbone the backbone's mask is used (its keep
            ratio, sampling and grid cell), and ``keep_ratio``/``sampling``
            given here must agree with the backbone's: a disagreement is
            refused when the run starts (``sbp_model_problem``).
            Default: None (follow the backbone; keep ratio 0.5 otherwise).
        **kwargs: the arguments of ``mmdet.models.FPN``.
    """

    def __init__(self, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sbp_given = dict(sbp or {})
        self.sbp_cfg, _ = SBPConfig.from_dict(sbp, (), 'FPNSBP')
        for i, module in enumerate(self.lateral_convs):
            SBPConvModule.adopt(module, f'FPNSBP.lateral_convs.{i}')
        for i, module in enumerate(self.fpn_convs):
            SBPConvModule.adopt(module, f'FPNSBP.fpn_convs.{i}')
        self.mask_sampler = RowMaskSampler(self.sbp_cfg)

    def sbp_active(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def forward(self, inputs: Tuple[Tensor]) -> tuple:
        if not self.sbp_active():
            return super().forward(inputs)
        iteration, strides = self._iteration(inputs)
        if iteration is None:
            return super().forward(inputs)
        with sbp_states(self._assignments(iteration, strides)):
            return super().forward(inputs)

    def _iteration(self, inputs: Sequence[Tensor]) -> Tuple[Optional[SBPIteration], List[int]]:
        """The backbone's iteration if it produced ``inputs``, else a new one."""
        upstream = SBPIteration.owner_of(inputs[0])
        if upstream is not None and upstream.keep_ratio >= 1.0:
            return None, []
        if upstream is not None:
            strides = [upstream.feature_stride(t) for t in inputs]
            if any(s is None for s in strides):
                raise ValueError('FPNSBP: some inputs were not produced by the SBP backbone of '
                                 'this iteration; check the backbone out_indices')
            for a, b in zip(strides, strides[1:]):
                if b != 2 * a:
                    raise ValueError(f'FPNSBP: input strides {strides} from the backbone do not '
                                     'double from level to level as FPN assumes')
            self._check_agrees(upstream)
            return upstream, strides
        if self.keep_ratio >= 1.0:
            return None, []
        strides = [2**i for i in range(len(inputs))]
        top = strides[self.backbone_end_level - 1]
        return SBPIteration.sample(self.mask_sampler, inputs[0].shape[2], top), strides

    def _check_agrees(self, upstream: SBPIteration) -> None:
        """Refuse ``sbp`` settings of this neck that differ from the backbone's mask
        (``tools/train.py`` and ``SBPHook`` refuse them earlier, from the config)."""
        mine = dict(keep_ratio=self.keep_ratio, sampling=self.sbp_cfg.sampling)
        for key in SHARED_KEYS:
            if key in self.sbp_given and mine[key] != getattr(upstream, key):
                raise ValueError(neck_disagreement(key, mine[key], getattr(upstream, key)))

    def _assignments(self, iteration: SBPIteration, strides: List[int]) -> list:
        """(module, state) for every conv whose input stride the mask covers."""
        level_strides = strides[self.start_level:self.backbone_end_level]
        inputs = list(zip(self.lateral_convs, level_strides))
        inputs += list(zip(self.fpn_convs, level_strides))
        extra_stride = {'on_input': strides[self.backbone_end_level - 1]}.get(
            self.add_extra_convs, level_strides[-1])
        for module in list(self.fpn_convs)[len(level_strides):]:
            inputs.append((module, extra_stride))
            extra_stride *= 2
        return [(module, SBPState(iteration, stride, self.sbp_cfg)) for module, stride in inputs
                if iteration.covers(stride * module.conv.stride[0])]
