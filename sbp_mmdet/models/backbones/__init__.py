from .convnext_sbp import ConvNeXtSBP, SBPConvNeXtBlock
from .resnet_sbp import ResNetSBP, SBPBasicBlock, SBPBottleneck

__all__ = ['ResNetSBP', 'SBPBasicBlock', 'SBPBottleneck', 'ConvNeXtSBP', 'SBPConvNeXtBlock']
