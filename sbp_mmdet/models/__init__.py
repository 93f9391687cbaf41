from .backbones import ResNetSBP
from .layers import SBPConvModule
from .necks import FPNSBP

__all__ = ['ResNetSBP', 'FPNSBP', 'SBPConvModule']
