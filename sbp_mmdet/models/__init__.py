from .backbones import ConvNeXtSBP, ResNetSBP
from .checks import sbp_model_problem
from .dense_heads import RetinaHeadSBP, RPNHeadSBP
from .layers import SBPConvModule
from .necks import FPNSBP

__all__ = ['ResNetSBP', 'ConvNeXtSBP', 'FPNSBP', 'RPNHeadSBP', 'RetinaHeadSBP', 'SBPConvModule',
           'sbp_model_problem']
