"""mmpretrain's ConvNeXt with Stochastic Backpropagation."""
from typing import List, Optional, Tuple

from mmdet.registry import MODELS
from torch import Tensor, nn

from ...sbp import (Add, ChannelsLast, ConvMix, DropPath, IdentityMix, LayerScale, LinearMix,
                    RowLocal, SBPBackboneMixin, SBPLayerMixin, SBPProgram, Unit)
from ...sbp.module import stage_switches, warn_with_cp_without_recompute
from .mmpretrain_convnext import ConvNeXt, ConvNeXtBlock, LayerNorm2d


class _ChannelLastNorm(nn.Module):
    """mmpretrain's ``LayerNorm2d`` called on ``(N, H, W, C)`` tensors."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x, data_format='channel_last')


class SBPConvNeXtBlock(SBPLayerMixin, ConvNeXtBlock):
    """``ConvNeXtBlock`` as three SBP units: the 7x7 depthwise conv (3-row halo)
    and LayerNorm; the first pointwise layer and its activation; the second
    pointwise layer, layer scale, DropPath and the residual add. Each unit
    stores its leading op's output at the kept rows, so backward re-runs only
    the LayerNorm and the activation; with ``recompute`` it stores the block
    input alone and re-runs the block on the kept rows."""

    def build_sbp_program(self) -> SBPProgram:
        if self.grn is not None:
            raise TypeError(f'{self.sbp_where}: SBP does not support GRN (use_grn=True, '
                            'ConvNeXt V2): its statistics span the whole map, not one row')
        where = self.sbp_where
        if self.linear_pw_conv:
            # norm and activation on the channels-last tensor, as the block runs them:
            # an activation on the (N, C, H, W) view of it can differ in the last bit
            norm, act = ChannelsLast(_ChannelLastNorm(self.norm)), ChannelsLast(self.act)
            pw1 = LinearMix(self.pointwise_conv1, where=f'{where}.pointwise_conv1')
            pw2 = LinearMix(self.pointwise_conv2, where=f'{where}.pointwise_conv2')
        else:
            norm, act = RowLocal(self.norm), RowLocal(self.act)
            pw1 = ConvMix(self.pointwise_conv1, where=f'{where}.pointwise_conv1')
            pw2 = ConvMix(self.pointwise_conv2, where=f'{where}.pointwise_conv2')
        scale = (LayerScale(self.gamma),) if self.gamma is not None else ()
        drop = (DropPath(self.drop_path),) if not isinstance(self.drop_path, nn.Identity) else ()
        depthwise = ConvMix(self.depthwise_conv, where=f'{where}.depthwise_conv')
        return SBPProgram([
            Unit('depthwise', 'input', depthwise, (norm,)),
            Unit('pointwise1', 'depthwise', pw1, (act,)),
            Unit('pointwise2', 'pointwise1', pw2, scale + drop + (Add('input'),)),
        ])


class SBPNormConv(SBPLayerMixin, nn.Sequential):
    """A stem or downsampling layer (convs and channel norms, in order) as SBP
    units: each conv starts a unit, each norm joins the tail of the one before."""

    def build_sbp_program(self) -> SBPProgram:
        units: List[Unit] = []
        for index, layer in enumerate(self):
            source = units[-1].name if units else 'input'
            if isinstance(layer, nn.Conv2d):
                mix = ConvMix(layer, where=f'{self.sbp_where}.{index}')
                units.append(Unit(str(index), source, mix))
            elif units:
                units[-1] = units[-1].with_tail(RowLocal(layer))
            else:
                units.append(Unit(str(index), source, IdentityMix(), (RowLocal(layer),)))
        return SBPProgram(units)


class _LayerNorm2dForward(nn.Module):
    """``LayerNorm2d``'s own forward on an ``SBPLayerNorm2d`` (whose forward
    runs its program), as a module, so that the unit sees its parameters."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return LayerNorm2d.forward(self.norm, x)


class SBPLayerNorm2d(SBPLayerMixin, LayerNorm2d):
    """mmpretrain's ``LayerNorm2d`` (an output norm ``norm{i}``) as one
    row-local SBP unit."""

    def build_sbp_program(self) -> SBPProgram:
        unit = Unit('norm', 'input', IdentityMix(), (RowLocal(_LayerNorm2dForward(self)),))
        return SBPProgram([unit], where=self.sbp_where)


@MODELS.register_module()
class ConvNeXtSBP(SBPBackboneMixin, ConvNeXt):
    """mmpretrain's ConvNeXt whose blocks train with Stochastic Backpropagation.

    A drop-in replacement for ``mmpretrain.ConvNeXt`` in detectors (swap
    ``type='mmpretrain.ConvNeXt'`` for ``type='ConvNeXtSBP'``): same
    arguments, same ``state_dict`` keys, identical outputs (bit for bit, with
    the same random DropPath draws). In training, the chosen stages compute
    gradients on the kept rows of their feature maps only: each block is three
    SBP units (``SBPConvNeXtBlock``), and each output norm ``norm{i}`` of an
    SBP stage (a ``LayerNorm2d``, the default ``norm_cfg``; another norm
    class runs densely) is one. SBP is off in eval mode and under
    ``torch.no_grad()``. The modules keep their classes' parameters and
    ``state_dict`` keys; only their class is swapped for an SBP subclass
    (``sbp_adopt``).

    Args:
        sbp (dict, optional): SBP settings. Keys: ``keep_ratio``,
            ``sampling``, ``per_image``, ``grid_cell``, ``grad_scale``,
            ``recompute`` (as ``ResNetSBP``; the blocks' ``with_cp``
            checkpoints only the blocks that run densely), ``exact_input_grad`` (see
            ``LayerConfig``; it needs convolutions with eval-mode BatchNorm, so
            ConvNeXt's blocks refuse it), ``overrides`` (per-stage layer keys, the
            stages named ``stage0``, ``stage1``, ...: e.g.
            ``overrides=dict(stage0=dict(recompute=True))``), ``stages`` (Sequence[bool]) or
            ``blocks``
            (Sequence[Sequence[bool]]): SBP per stage or per block (default:
            every stage but the last, skipping frozen stages, the paper's
            practice), and ``downsample`` (bool): also run the stem and the
            downsampling layers (LayerNorm + 2x2 stride-2 conv) in front of an
            SBP stage with SBP. Default True: dense, each stores full maps
            (its conv's and its norm's inputs); with SBP, only their kept
            rows (their 4x4/2x2 convs, stride = kernel, have no halo).
            Figures: docs/memory.md.
        *args, **kwargs: the arguments of ``mmpretrain.models.ConvNeXt``,
            positional ones in its order (``sbp`` is keyword-only);
            ``gap_before_final_norm`` must be False (feature maps, as in
            mmdet's ConvNeXt configs) and ``use_grn`` False (GRN is not
            row-local) where SBP is on.

    Raises:
        ValueError: for ``gap_before_final_norm=True`` or a bad ``sbp`` value.
        KeyError: for an unknown ``sbp`` key.
        TypeError: for blocks SBP cannot run (GRN), naming the block.
    """

    def __init__(self, *args, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extra = self.init_sbp(sbp, draws_mask=True,
                              groups=[f'stage{i}' for i in range(self.num_stages)],
                              extra_keys=('stages', 'blocks', 'downsample'))
        if self.gap_before_final_norm:
            raise ValueError(f'{self.sbp_name}: gap_before_final_norm=True pools the outputs '
                             'to vectors; SBP needs feature maps: set it to False')
        stem_stride = self.downsample_layers[0][0].stride[0]
        self.stage_strides = [stem_stride * 2**i for i in range(self.num_stages)]
        self.sbp_blocks = stage_switches(self.sbp_name, self.depths, self.frozen_stages,
                                         extra.get('stages'), extra.get('blocks'))
        self.sbp_downsample = extra.get('downsample', True)
        if not isinstance(self.sbp_downsample, bool):
            raise ValueError(f'{self.sbp_name}: sbp.downsample must be True or False, '
                             f'got {self.sbp_downsample!r}')
        self.sbp_layer_inputs = self._adopt_sbp_layers()
        warn_with_cp_without_recompute(self)
        sbp_strides = [self.stage_strides[i] for i, s in enumerate(self.sbp_blocks) if any(s)]
        self.sbp_base_stride = max(sbp_strides, default=stem_stride)

    def _adopt_sbp_layers(self) -> List[Tuple[nn.Module, int]]:
        """Make the blocks, downsampling layers and output norms that run with
        SBP SBP layers (``sbp_adopt``); their ``(layer, input stride)``."""
        layers = []
        for i, switches in enumerate(self.sbp_blocks):
            group = f'stage{i}'
            # a stage's downsampling layer is not its first block: every block
            # reads the stage's stride
            for j, (block, on) in enumerate(zip(self.stages[i], switches)):
                if on:
                    self.sbp_adopt(block, (SBPConvNeXtBlock,), f'stages.{i}.{j}', group)
                    layers.append((block, self.stage_strides[i]))
            if self.sbp_downsample and switches[0]:
                down = self.sbp_adopt(self.downsample_layers[i], (SBPNormConv,),
                                      f'downsample_layers.{i}', group)
                layers.append((down, self.stage_strides[i - 1] if i else 1))
            norm = getattr(self, f'norm{i}', None)
            if switches[-1] and i in self.out_indices and type(norm) is LayerNorm2d:
                self.sbp_adopt(norm, (SBPLayerNorm2d,), f'norm{i}', group)
                layers.append((norm, self.stage_strides[i]))
        return layers
