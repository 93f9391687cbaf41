from .sbp_conv_module import SBPConvModule, conv_module_unit

__all__ = ['SBPConvModule', 'conv_module_unit']
