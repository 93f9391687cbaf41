from .backbones import ResNetSBP
from .checks import sbp_model_problem
from .necks import FPNSBP

__all__ = ['ResNetSBP', 'FPNSBP', 'sbp_model_problem']
