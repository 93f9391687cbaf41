"""Res2Net (hierarchical 3x3 splits) with Stochastic Backpropagation."""
from typing import List

from mmdet.models.backbones import Res2Net
from mmdet.models.backbones.res2net import Bottle2neck
from mmdet.registry import MODELS

from ...sbp import Add, ChannelSlice, Concat, IdentityMix, PoolMix, SBPProgram, Unit, conv_unit
from .resnet_sbp import SBPBlockMixin, SBPResNetMixin, check_block, shortcut_units


class SBPBottle2neck(SBPBlockMixin, Bottle2neck):
    """Res2Net's ``Bottle2neck`` as an SBP layer.

    The program: ``conv1``; split ``i`` of its output (``ChannelSlice``), plus
    the previous scale's output in a ``'normal'`` block (``Add``), feeds the
    3x3 ``convs[i]``; the scales' outputs and the last split (average-pooled
    in a strided ``'stage'`` block, ``PoolMix``) are concatenated (``Concat``)
    into ``conv3``, which adds the shortcut.
    """

    def build_sbp_program(self) -> SBPProgram:
        where = self.sbp_where
        check_block(self, where)
        units = [conv_unit('conv1', 'input', self.conv1, self.norm1, relu_after=True,
                           where=f'{where}.conv1')]
        for i, (conv, norm) in enumerate(zip(self.convs, self.bns)):
            tail = (ChannelSlice(i * self.width, self.width),)
            if i > 0 and self.stage_type != 'stage':
                tail += (Add(f'convs.{i - 1}'),)
            units += [Unit(f'split.{i}', 'conv1', IdentityMix(), tail),
                      conv_unit(f'convs.{i}', f'split.{i}', conv, norm, relu_after=True,
                                where=f'{where}.convs.{i}')]
        last = self.scales - 1
        units.append(Unit(f'split.{last}', 'conv1', IdentityMix(),
                          (ChannelSlice(last * self.width, self.width),)))
        last_name = f'split.{last}'
        if self.stage_type == 'stage' and self.conv2_stride != 1:
            units.append(Unit('pool', last_name, PoolMix(self.pool, f'{where}.pool')))
            last_name = 'pool'
        parts: List[str] = [f'convs.{i}' for i in range(1, last)] + [last_name]
        units.append(Unit('cat', 'convs.0', IdentityMix(), tuple(Concat(p) for p in parts)))
        shortcut, residual = shortcut_units(self, where)
        units += shortcut + [conv_unit('conv3', 'cat', self.conv3, self.norm3, relu_after=True,
                                       residual=residual, where=f'{where}.conv3')]
        return SBPProgram(units, where=where)


@MODELS.register_module()
class Res2NetSBP(SBPResNetMixin, Res2Net):
    """mmdet's ``Res2Net`` whose blocks train with SBP.

    Same arguments (``scales``, ``base_width`` and those of ``ResNet``; its
    deep stem and ``avg_down`` shortcuts), same ``state_dict`` keys, identical
    outputs; SBP is off in eval mode.

    Args:
        sbp (dict, optional): SBP settings, the keys of ``ResNetSBP`` (listed
            there).
        *args, **kwargs: the arguments of ``mmdet.models.Res2Net``, positional ones in
            its order (``sbp`` is keyword-only).
    """

    sbp_layer_classes = (SBPBottle2neck,)
