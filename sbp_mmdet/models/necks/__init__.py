from .fpn_sbp import FPNSBP

__all__ = ['FPNSBP']
