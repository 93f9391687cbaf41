from .fpn_sbp import FPNSBP, SBPConvModule

__all__ = ['FPNSBP', 'SBPConvModule']
