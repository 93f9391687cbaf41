from .convnext_sbp import ConvNeXtSBP, SBPConvNeXtBlock
from .res2net_sbp import Res2NetSBP, SBPBottle2neck
from .resnet_sbp import ResNetSBP, ResNetV1dSBP, SBPBasicBlock, SBPBottleneck, SBPResNetMixin
from .resnext_sbp import RegNetSBP, ResNeXtSBP, SBPResNeXtBottleneck
from .swin_sbp import SBPPatchMerging, SBPSwinBlock, SwinTransformerSBP

__all__ = ['ResNetSBP', 'ResNetV1dSBP', 'ResNeXtSBP', 'RegNetSBP', 'Res2NetSBP', 'SBPResNetMixin',
           'SBPBasicBlock', 'SBPBottleneck', 'SBPResNeXtBottleneck', 'SBPBottle2neck',
           'ConvNeXtSBP', 'SBPConvNeXtBlock', 'SwinTransformerSBP', 'SBPSwinBlock',
           'SBPPatchMerging']
