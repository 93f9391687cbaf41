from .backbones import (ConvNeXtSBP, RegNetSBP, Res2NetSBP, ResNetSBP, ResNetV1dSBP, ResNeXtSBP,
                        SwinTransformerSBP)
from .checks import sbp_model_problem
from .dense_heads import RetinaHeadSBP, RPNHeadSBP
from .layers import SBPConvModule
from .necks import FPNSBP

__all__ = ['ResNetSBP', 'ResNetV1dSBP', 'ResNeXtSBP', 'RegNetSBP', 'Res2NetSBP',
           'ConvNeXtSBP', 'SwinTransformerSBP', 'FPNSBP',
           'RPNHeadSBP', 'RetinaHeadSBP', 'SBPConvModule', 'sbp_model_problem']
