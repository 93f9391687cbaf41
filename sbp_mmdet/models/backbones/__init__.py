from .resnet_sbp import ResNetSBP, SBPBasicBlock, SBPBottleneck

__all__ = ['ResNetSBP', 'SBPBasicBlock', 'SBPBottleneck']
