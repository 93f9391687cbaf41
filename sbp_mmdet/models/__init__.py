from .backbones import ResNetSBP
from .necks import FPNSBP

__all__ = ['ResNetSBP', 'FPNSBP']
