"""mmpretrain's ConvNeXt with Stochastic Backpropagation."""
from typing import Dict, List, Optional, Tuple

from mmdet.registry import MODELS
from torch import Tensor, nn

from ...sbp import (Add, ChannelsLast, ConvMix, DropPath, IdentityMix, LayerScale, LinearMix,
                    RowLocal, SBPBackboneMixin, SBPProgram, SBPState, Unit)
from ...sbp.module import stage_switches
from ...sbp.tracing import check_layer_not_traced
from .mmpretrain_convnext import ConvNeXt, ConvNeXtBlock


class _ChannelLastNorm(nn.Module):
    """mmpretrain's ``LayerNorm2d`` called on ``(N, H, W, C)`` tensors."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x, data_format='channel_last')


class _SBPLayerMixin:
    """Runs a layer as its SBP program while ``sbp_state`` is set."""

    sbp_state: Optional[SBPState] = None
    sbp_where: str = ''
    with_cp: bool = False

    def sbp_program(self) -> SBPProgram:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.sbp_state is None:
            check_layer_not_traced(self)  # torch.fx would record the dense path
            return super().forward(x)
        return self.sbp_state.run(self.sbp_program(), x, recompute=self.with_cp)


class SBPConvNeXtBlock(_SBPLayerMixin, ConvNeXtBlock):
    """``ConvNeXtBlock`` as three SBP units: the 7x7 depthwise conv (3-row halo)
    and LayerNorm; the first pointwise layer and its activation; the second
    pointwise layer, layer scale, DropPath and the residual add. Each unit
    stores its leading op's output at the kept rows, so backward re-runs only
    the LayerNorm and the activation; with ``with_cp`` (``recompute``) it
    stores the block input alone and re-runs the block on the kept rows."""

    def sbp_program(self) -> SBPProgram:
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


class SBPNormConv(_SBPLayerMixin, nn.Sequential):
    """A stem or downsampling layer (convs and channel norms, in order) as SBP
    units: each conv starts a unit, each norm joins the tail of the one before."""

    def sbp_program(self) -> SBPProgram:
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


class _DenseForward(nn.Module):
    """The forward of an SBP layer's parent class (the layer without SBP)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return super(_SBPLayerMixin, self.layer).forward(x)


class _SBPOutNorm(_SBPLayerMixin):
    """An output norm (``norm{i}``, any norm class) as one row-local SBP unit."""

    def sbp_program(self) -> SBPProgram:
        return SBPProgram([Unit('norm', 'input', IdentityMix(), (RowLocal(_DenseForward(self)),))])


_OUT_NORM_CLASSES: Dict[type, type] = {}


def _sbp_out_norm_class(norm_class: type) -> type:
    """``norm_class`` made an SBP layer (one class per norm class, kept in this
    module's namespace so that models pickle)."""
    if norm_class not in _OUT_NORM_CLASSES:
        name = f'SBPOutNorm_{norm_class.__name__}'
        sbp_class = type(name, (_SBPOutNorm, norm_class), {'__module__': __name__})
        globals()[name] = _OUT_NORM_CLASSES[norm_class] = sbp_class
    return _OUT_NORM_CLASSES[norm_class]


@MODELS.register_module()
class ConvNeXtSBP(SBPBackboneMixin, ConvNeXt):
    """mmpretrain's ConvNeXt whose blocks train with Stochastic Backpropagation.

    A drop-in replacement for ``mmpretrain.ConvNeXt`` in detectors (swap
    ``type='mmpretrain.ConvNeXt'`` for ``type='ConvNeXtSBP'``): same
    arguments, same ``state_dict`` keys, identical outputs (bit for bit, with
    the same random DropPath draws). In training, the chosen stages compute
    gradients on the kept rows of their feature maps only: each block is three
    SBP units (``SBPConvNeXtBlock``), and each output norm ``norm{i}`` of an
    SBP stage is one. SBP is off in eval mode and under
    ``torch.no_grad()``. The modules keep their classes' parameters and
    ``state_dict`` keys; only their class is swapped for an SBP subclass.

    Args:
        sbp (dict, optional): SBP settings. Keys: ``keep_ratio``,
            ``sampling``, ``per_image``, ``grid_cell``, ``grad_scale``,
            ``recompute`` (as ``ResNetSBP``), ``exact_input_grad`` (see
            ``SBPConfig``; it needs convolutions with eval-mode BatchNorm, so
            ConvNeXt's blocks refuse it), ``stages`` (Sequence[bool]) or ``blocks``
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

    sbp_extra_keys = ('stages', 'blocks', 'downsample')

    def __init__(self, *args, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extra = self.init_sbp(sbp, self.sbp_extra_keys)
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
        self._make_sbp_layers()
        self.sbp_layer_inputs = self._sbp_layer_inputs()
        self.sbp_check_layers()
        sbp_strides = [self.stage_strides[i] for i, s in enumerate(self.sbp_blocks) if any(s)]
        self.sbp_base_stride = max(sbp_strides, default=stem_stride)

    def _make_sbp_layers(self) -> None:
        """Give the blocks, downsampling layers and output norms their SBP
        classes (same modules and parameters: only the forward changes)."""
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            down.__class__ = SBPNormConv
            down.sbp_where = f'{self.sbp_name}.downsample_layers.{i}'
            for j, block in enumerate(stage):
                block.__class__ = SBPConvNeXtBlock
                block.sbp_where = f'{self.sbp_name}.stages.{i}.{j}'
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                norm.__class__ = _sbp_out_norm_class(type(norm))
                norm.sbp_where = f'{self.sbp_name}.norm{i}'

    def _sbp_layer_inputs(self) -> List[Tuple[nn.Module, int]]:
        """``(layer, input stride)`` of the layers that run with SBP."""
        layers = []
        for i, switches in enumerate(self.sbp_blocks):
            # a stage's downsampling layer is not its first block: every block
            # reads the stage's stride
            layers += [(block, self.stage_strides[i])
                       for block, on in zip(self.stages[i], switches) if on]
            if self.sbp_downsample and switches[0]:
                layers.append((self.downsample_layers[i],
                               self.stage_strides[i - 1] if i else 1))
            if switches[-1] and i in self.out_indices:
                layers.append((getattr(self, f'norm{i}'), self.stage_strides[i]))
        return layers
