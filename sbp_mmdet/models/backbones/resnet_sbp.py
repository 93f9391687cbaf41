"""ResNet with Stochastic Backpropagation."""
from typing import List, Optional, Sequence, Tuple

import torch
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmdet.registry import MODELS
from torch import Tensor, nn

from ...sbp import (ConvUnit, RowMaskSampler, SBPConfig, SBPIteration, SBPProgram, SBPState,
                    check_unit_layers)
from ...sbp.state import SBPModuleMixin, sbp_states

STEM_STRIDE = 4


def _downsample_unit(block: nn.Module, residual_of: str) -> Tuple[List[ConvUnit], str]:
    """The shortcut of ``block`` as units, and the name the residual add reads."""
    if block.downsample is None:
        return [], 'input'
    layers = list(block.downsample)
    if len(layers) != 2:
        raise TypeError(f'{residual_of}: SBP supports a conv + norm shortcut; '
                        'avg_down=True (AvgPool2d shortcut) is not supported')
    check_unit_layers(layers[0], layers[1], f'{residual_of}.downsample')
    return [ConvUnit('downsample', 'input', layers[0], layers[1])], 'downsample'


def _check_block(block: nn.Module, where: str) -> None:
    if getattr(block, 'with_dcn', False):
        raise TypeError(f'{where}: SBP does not support DCN blocks; disable SBP for this stage')
    if getattr(block, 'with_plugins', False):
        raise TypeError(f'{where}: SBP does not support block plugins; disable SBP for this stage')


class _SBPBlockMixin:
    """Runs a residual block as an SBP program while ``sbp_state`` is set."""

    sbp_state: Optional[SBPState] = None

    def sbp_program(self, where: Optional[str] = None) -> SBPProgram:
        """The block as an SBP program; ``where`` names the block in errors."""
        where = where or type(self).__name__
        _check_block(self, where)
        shortcut, residual = _downsample_unit(self, where)
        *body, last = self._main_units()
        units = body + shortcut + [ConvUnit(last.name, last.source, last.conv, last.norm,
                                            relu=True, residual=residual)]
        for unit in units:
            check_unit_layers(unit.conv, unit.norm, f'{where}.{unit.name}')
        return SBPProgram(units)

    def _main_units(self) -> List[ConvUnit]:
        """The units of the main branch, the last one before its residual add."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.sbp_state is None:
            return super().forward(x)
        return self.sbp_state.run(self.sbp_program(), x, recompute=self.with_cp)


class SBPBasicBlock(_SBPBlockMixin, BasicBlock):
    """``BasicBlock`` that runs as an SBP program while ``sbp_state`` is set."""

    def _main_units(self) -> List[ConvUnit]:
        return [ConvUnit('conv1', 'input', self.conv1, self.norm1, relu=True),
                ConvUnit('conv2', 'conv1', self.conv2, self.norm2)]


class SBPBottleneck(_SBPBlockMixin, Bottleneck):
    """``Bottleneck`` that runs as an SBP program while ``sbp_state`` is set."""

    def _main_units(self) -> List[ConvUnit]:
        return [ConvUnit('conv1', 'input', self.conv1, self.norm1, relu=True),
                ConvUnit('conv2', 'conv1', self.conv2, self.norm2, relu=True),
                ConvUnit('conv3', 'conv2', self.conv3, self.norm3)]


_SBP_BLOCKS = {BasicBlock: SBPBasicBlock, Bottleneck: SBPBottleneck}


@MODELS.register_module()
class ResNetSBP(SBPModuleMixin, ResNet):
    """ResNet whose blocks train with Stochastic Backpropagation (SBP).

    A drop-in replacement for mmdet's ``ResNet``: same arguments, same
    ``state_dict`` keys (weights load either way), identical outputs. In
    training, the blocks chosen by ``sbp`` compute gradients on the kept rows
    of their feature maps only, storing and back-propagating a fraction of
    their activations (see ``sbp_mmdet.sbp``). SBP is off in eval mode and
    under ``torch.no_grad()``, where the module is exactly ``ResNet``.

    Args:
        sbp (dict, optional): SBP settings. Keys:

            - ``keep_ratio`` (float): fraction of rows kept, in (0, 1].
              Default 0.5. 1.0 trains densely.
            - ``sampling`` (str): ``'grid'`` (periodic rows, random offset per
              iteration; default) or ``'random'``.
            - ``grid_cell`` (int): with ``'grid'`` sampling, rows of the base
              mask kept or dropped together. Default 2; taller cells save
              more (a smaller share of 3x3 halo rows).
            - ``grad_scale`` (str): ``'none'`` (default) or ``'inverse_keep'``.
            - ``recompute`` (bool): recompute block internals on the kept rows
              in backward instead of storing them. Default False. A block with
              ``with_cp=True`` recomputes as if this were True.
            - ``stages`` (Sequence[bool]): SBP per stage, e.g.
              ``(False, True, True, False)``.
            - ``blocks`` (Sequence[Sequence[bool]]): SBP per block of each
              stage, instead of ``stages``.

            Default (neither ``stages`` nor ``blocks``): every stage but the
            last, skipping frozen stages: the paper's practice of SBP in the
            early and middle stages with the last blocks dense. Asking SBP on
            a frozen stage is an error: frozen stages compute no gradients.
        **kwargs: the arguments of ``mmdet.models.ResNet``.

    Example:
        >>> import torch
        >>> from sbp_mmdet.models import ResNetSBP
        >>> model = ResNetSBP(depth=18, sbp=dict(keep_ratio=0.5)).train()
        >>> outs = model(torch.rand(2, 3, 64, 96))
        >>> [tuple(o.shape) for o in outs]
        [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    """

    def __init__(self, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sbp_cfg, extra = SBPConfig.from_dict(sbp, ('stages', 'blocks'), 'ResNetSBP')
        self.sbp_blocks = self._resolve_switches(extra.get('stages'), extra.get('blocks'))
        for i, switches in enumerate(self.sbp_blocks):
            layer = getattr(self, self.res_layers[i])
            for j, enabled in enumerate(switches):
                if enabled:
                    # fail at build time on unsupported layers, naming them
                    layer[j].sbp_program(f'ResNetSBP.{self.res_layers[i]}.{j}')
        self.stage_strides = self._stage_strides()
        sbp_strides = [self.stage_strides[i] for i, s in enumerate(self.sbp_blocks) if any(s)]
        self.sbp_base_stride = max(sbp_strides, default=STEM_STRIDE)
        self.mask_sampler = RowMaskSampler(self.sbp_cfg)
        self.sbp_iteration: Optional[SBPIteration] = None

    def make_res_layer(self, **kwargs) -> nn.Module:
        kwargs['block'] = _SBP_BLOCKS.get(kwargs['block'], kwargs['block'])
        return super().make_res_layer(**kwargs)

    def _resolve_switches(self, stages: Optional[Sequence[bool]],
                          blocks: Optional[Sequence[Sequence[bool]]]) -> List[List[bool]]:
        num = len(self.stage_blocks)
        if stages is not None and blocks is not None:
            raise ValueError('ResNetSBP: give sbp.stages or sbp.blocks, not both')
        if blocks is not None:
            if len(blocks) != num or any(len(b) != n for b, n in zip(blocks, self.stage_blocks)):
                raise ValueError(f'ResNetSBP: sbp.blocks must have {num} lists of lengths '
                                 f'{list(self.stage_blocks)}, got {[len(b) for b in blocks]}')
            switches = [[bool(s) for s in b] for b in blocks]
            asked = [any(s) for s in switches]
        elif stages is not None:
            if len(stages) != num:
                raise ValueError(f'ResNetSBP: sbp.stages must have {num} entries (one per '
                                 f'stage), got {len(stages)}')
            asked = [bool(s) for s in stages]
            switches = [[s] * n for s, n in zip(asked, self.stage_blocks)]
        else:
            asked = [i < num - 1 and i >= self.frozen_stages for i in range(num)]
            switches = [[s] * n for s, n in zip(asked, self.stage_blocks)]
        frozen = [i for i in range(num) if asked[i] and i < self.frozen_stages]
        if frozen:
            raise ValueError(
                f'ResNetSBP: SBP asked on frozen stage(s) {frozen} (frozen_stages='
                f'{self.frozen_stages}); frozen stages compute no gradients, so SBP would '
                'change nothing there. Turn it off for those stages in sbp.stages/sbp.blocks.')
        return switches

    def _stage_strides(self) -> List[int]:
        strides, stride = [], STEM_STRIDE
        for s in self.strides:
            stride *= s
            strides.append(stride)
        return strides

    def sbp_active(self) -> bool:
        """Whether the next forward uses SBP."""
        return (self.training and torch.is_grad_enabled() and self.keep_ratio < 1.0
                and any(any(s) for s in self.sbp_blocks))

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        if not self.sbp_active():
            outs = super().forward(x)
            if self.training and torch.is_grad_enabled():  # tell an SBP neck: dense this time
                self._publish(outs, SBPIteration.dense(self.sbp_base_stride))
            return outs
        iteration = SBPIteration.sample(self.mask_sampler, x.shape[2], self.sbp_base_stride)
        assignments = []
        in_stride = STEM_STRIDE
        for i, switches in enumerate(self.sbp_blocks):
            layer = getattr(self, self.res_layers[i])
            for j, enabled in enumerate(switches):
                block_stride = in_stride if j == 0 else self.stage_strides[i]
                if enabled:
                    assignments.append((layer[j], SBPState(iteration, block_stride,
                                                           self.sbp_cfg)))
            in_stride = self.stage_strides[i]
        with sbp_states(assignments):
            outs = super().forward(x)
        self._publish(outs, iteration)
        return outs

    def _publish(self, outs: Tuple[Tensor, ...], iteration: SBPIteration) -> None:
        """Record the iteration and the outputs' strides for the neck and hooks."""
        for out, i in zip(outs, sorted(self.out_indices)):
            iteration.set_feature_stride(out, self.stage_strides[i])
        self.sbp_iteration = iteration
