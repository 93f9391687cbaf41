from .retina_head_sbp import RetinaHeadSBP
from .rpn_head_sbp import RPNHeadSBP
from .sbp_head_mixin import SBPDenseHeadMixin

__all__ = ['RPNHeadSBP', 'RetinaHeadSBP', 'SBPDenseHeadMixin']
