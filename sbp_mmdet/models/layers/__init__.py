from .sbp_conv_module import SBPConvModule

__all__ = ['SBPConvModule']
