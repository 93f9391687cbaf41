"""ResNeXt and RegNet (grouped-conv bottlenecks) with Stochastic Backpropagation."""
from mmdet.models.backbones import RegNet, ResNeXt
from mmdet.models.backbones.resnext import Bottleneck as ResNeXtBottleneck
from mmdet.registry import MODELS

from .resnet_sbp import SBPBottleneck, SBPResNetMixin


class SBPResNeXtBottleneck(SBPBottleneck, ResNeXtBottleneck):
    """ResNeXt's ``Bottleneck`` (grouped 3x3 conv) as an SBP layer: the
    layers of ``SBPBottleneck``."""


@MODELS.register_module()
class ResNeXtSBP(SBPResNetMixin, ResNeXt):
    """mmdet's ``ResNeXt`` whose blocks train with SBP.

    Same arguments (``groups``, ``base_width`` and those of ``ResNet``), same
    ``state_dict`` keys, identical outputs; SBP is off in eval mode.

    Args:
        sbp (dict, optional): SBP settings, the keys of ``ResNetSBP`` (listed
            there).
        *args, **kwargs: the arguments of ``mmdet.models.ResNeXt``, positional ones in
            its order (``sbp`` is keyword-only).
    """

    sbp_layer_classes = (SBPResNeXtBottleneck,)


@MODELS.register_module()
class RegNetSBP(SBPResNetMixin, RegNet):
    """mmdet's ``RegNet`` (ResNeXt bottlenecks, stride-2 stem) whose blocks
    train with SBP.

    Same arguments (``arch`` as a name such as ``'regnetx_3.2gf'`` or a dict),
    same ``state_dict`` keys, identical outputs; SBP is off in eval mode.

    Args:
        sbp (dict, optional): SBP settings, the keys of ``ResNetSBP`` (listed
            there).
        *args, **kwargs: the arguments of ``mmdet.models.RegNet``, positional ones in
            its order (``sbp`` is keyword-only).
    """

    sbp_layer_classes = (SBPResNeXtBottleneck,)
    stem_stride = 2
