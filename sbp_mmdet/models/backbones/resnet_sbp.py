"""ResNet with Stochastic Backpropagation."""
import math
from typing import List, Optional, Tuple

from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet, ResNetV1d
from mmdet.registry import MODELS
from torch import nn

from ...sbp import (PoolMix, RowLocal, SBPBackboneMixin, SBPLayerMixin, SBPProgram, Unit, conv_unit,
                    norm_op)
from ...sbp.module import stage_layers, stage_switches, warn_with_cp_without_recompute


def shortcut_units(block: nn.Module, residual_of: str) -> Tuple[List[Unit], str]:
    """The shortcut of ``block`` as units, and the name the residual add reads.

    A conv + norm shortcut is a conv unit; ``avg_down``'s AvgPool2d + 1x1 conv
    + norm is a pool unit whose tail runs the conv and the norm.
    """
    if block.downsample is None:
        return [], 'input'
    layers, where = list(block.downsample), f'{residual_of}.downsample'
    if len(layers) == 2:
        return [conv_unit('downsample', 'input', layers[0], layers[1], where=where)], 'downsample'
    if len(layers) == 3 and isinstance(layers[0], nn.AvgPool2d):
        pool, conv, norm = layers
        if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.stride != (1, 1):
            raise TypeError(f'{where}: SBP supports an AvgPool2d shortcut followed by a plain '
                            f'1x1 stride-1 nn.Conv2d, got {conv}')
        tail = (RowLocal(conv), norm_op(norm, where))
        return [Unit('downsample', 'input', PoolMix(pool, where), tail)], 'downsample'
    raise TypeError(f'{where}: SBP supports a conv + norm or an AvgPool2d + conv + norm '
                    f'shortcut, got {[type(m).__name__ for m in layers]}')


def check_block(block: nn.Module, where: str) -> None:
    """Refuse what SBP blocks cannot run (DCN, plugins), naming ``where``."""
    if getattr(block, 'with_dcn', False):
        raise TypeError(f'{where}: SBP does not support DCN blocks; disable SBP for this stage')
    if getattr(block, 'with_plugins', False):
        raise TypeError(f'{where}: SBP does not support block plugins; disable SBP for this stage')


class SBPBlockMixin(SBPLayerMixin):
    """A residual block as an SBP program.

    A chain of conv + norm layers declares them in ``_main_layers``; a block
    with another graph overrides ``build_sbp_program`` (``SBPBottle2neck``).
    """

    def build_sbp_program(self) -> SBPProgram:
        where = self.sbp_where
        check_block(self, where)
        shortcut, residual = shortcut_units(self, where)
        *body, (name, source, conv, norm) = self._main_layers()
        units = [conv_unit(n, s, c, b, relu_after=True, where=f'{where}.{n}')
                 for n, s, c, b in body]
        units += shortcut + [conv_unit(name, source, conv, norm, relu_after=True,
                                       residual=residual, where=f'{where}.{name}')]
        return SBPProgram(units, where=where)

    def _main_layers(self) -> List[tuple]:
        """``(name, source, conv, norm)`` of the main branch's layers, in order."""
        raise NotImplementedError


class SBPBasicBlock(SBPBlockMixin, BasicBlock):
    """mmdet's ``BasicBlock`` as an SBP layer."""

    def _main_layers(self) -> List[tuple]:
        return [('conv1', 'input', self.conv1, self.norm1),
                ('conv2', 'conv1', self.conv2, self.norm2)]


class SBPBottleneck(SBPBlockMixin, Bottleneck):
    """mmdet's ``Bottleneck`` as an SBP layer."""

    def _main_layers(self) -> List[tuple]:
        return [('conv1', 'input', self.conv1, self.norm1),
                ('conv2', 'conv1', self.conv2, self.norm2),
                ('conv3', 'conv2', self.conv3, self.norm3)]


class SBPResNetMixin(SBPBackboneMixin):
    """SBP for the blocks of mmdet's ``ResNet`` and its subclasses.

    A backbone subclasses it before its mmdet class (``ResNetSBP``,
    ``ResNeXtSBP``, ``RegNetSBP``, ``Res2NetSBP``) and names the SBP
    versions of its block classes in ``sbp_layer_classes``; the blocks of the
    SBP stages are made SBP layers (``sbp_adopt``), the others stay mmdet's.
    ``stem_stride`` is the stride of the stem. The layer groups are the
    stages, by their mmdet names (``layer1``, ...). See ``ResNetSBP`` for
    the ``sbp`` keys.
    """

    sbp_layer_classes: Tuple[type, ...] = (SBPBasicBlock, SBPBottleneck)
    stem_stride = 4

    def __init__(self, *args, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extra = self.init_sbp(sbp, draws_mask=True, groups=self.res_layers,
                              extra_keys=('stages', 'blocks'))
        self.sbp_blocks = stage_switches(self.sbp_name, self.stage_blocks, self.frozen_stages,
                                         extra.get('stages'), extra.get('blocks'))
        self.stage_strides = [self.stem_stride * math.prod(self.strides[:i + 1])
                              for i in range(len(self.stage_blocks))]
        stages = [getattr(self, name) for name in self.res_layers]
        for name, stage, switches in zip(self.res_layers, stages, self.sbp_blocks):
            for j, (block, on) in enumerate(zip(stage, switches)):
                if on:
                    self.sbp_adopt(block, self.sbp_layer_classes, f'{name}.{j}', group=name)
        self.sbp_layer_inputs = stage_layers(stages, self.sbp_blocks, self.stem_stride,
                                             self.stage_strides)
        sbp_strides = [self.stage_strides[i] for i, s in enumerate(self.sbp_blocks) if any(s)]
        self.sbp_base_stride = max(sbp_strides, default=self.stem_stride)
        warn_with_cp_without_recompute(self)


@MODELS.register_module()
class ResNetSBP(SBPResNetMixin, ResNet):
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
            - ``sampling`` (str): the mask policy: ``'grid'`` (periodic rows,
              random offset per iteration, complementary across DDP ranks;
              default), ``'random'``, ``'objects'`` (rows covering
              ground-truth boxes first; needs ``SBPHook``) or a policy
              registered with ``sbp_mmdet.sbp.register_mask_policy``.
            - ``per_image`` (bool): one mask per image, each keeping the same
              number of rows, instead of one for the batch. Default False.
            - ``grid_cell`` (int): with ``'grid'`` sampling, rows of the base
              mask kept or dropped together. Default 2; taller cells save
              more (a smaller share of 3x3 halo rows).
            - ``grad_scale`` (str): ``'none'`` (default) or ``'inverse_keep'``.
            - ``recompute`` (bool | str): recompute block internals on the
              kept rows in backward instead of storing them: ``True`` keeps
              the inputs of 3x3 convs, ``'all'`` only each block's input (more
              for bottlenecks; see ``LayerConfig``). Default False. The one
              switch of the SBP blocks: ``with_cp=True`` checkpoints the
              blocks that run densely (the last stage), as in mmdet.
            - ``exact_input_grad`` (bool): SBP on the parameters' gradients
              only, every activation gets its exact gradient (see
              ``LayerConfig``). Needs ``norm_eval=True``. Default False.
            - ``overrides`` (dict): the keys ``grad_scale``, ``recompute`` and
              ``exact_input_grad`` for one stage, by its name, over the
              module's: e.g. ``overrides=dict(layer1=dict(recompute='all'))``.
            - ``stages`` (Sequence[bool]): SBP per stage, e.g.
              ``(False, True, True, False)``.
            - ``blocks`` (Sequence[Sequence[bool]]): SBP per block of each
              stage, instead of ``stages``.

            The first four are the mask keys: the backbone draws the mask
            that the SBP neck and heads follow, so they are written here only.

            Default (neither ``stages`` nor ``blocks``): every stage but the
            last, skipping frozen stages: the paper's practice of SBP in the
            early and middle stages with the last blocks dense. Asking SBP on
            a frozen stage is an error: frozen stages compute no gradients.
        *args, **kwargs: the arguments of ``mmdet.models.ResNet``, positional ones in
            its order (``sbp`` is keyword-only).

    Example:
        >>> import torch
        >>> from sbp_mmdet.models import ResNetSBP
        >>> model = ResNetSBP(depth=18, sbp=dict(keep_ratio=0.5))
        >>> model = model.train()  # SBP is on in training
        >>> outs = model(torch.rand(2, 3, 64, 96))
        >>> [tuple(o.shape) for o in outs]
        [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    """


@MODELS.register_module()
class ResNetV1dSBP(SBPResNetMixin, ResNetV1d):
    """mmdet's ``ResNetV1d`` (deep stem, ``avg_down`` shortcuts) with SBP;
    arguments and ``sbp`` keys as ``ResNetSBP``."""
