"""The SBP mechanism shared by every SBP backbone and neck.

- ``config``: the validated ``sbp=dict(...)`` settings.
- ``masks``: row keep masks, one base mask per iteration at the coarsest
  SBP stride, replicated to finer strides.
- ``rows``: convolutions at a subset of output rows (bands with halos).
- ``norm``: BatchNorm at packed rows with full-map statistics.
- ``program``: SBP units (conv, norm, residual, ReLU) and the autograd
  function that runs a block of them.
- ``memory``: bytes saved for backward, the device-independent measure.
"""
from .config import SBPConfig
from .masks import RowMaskSampler, SBPIteration
from .memory import SavedTensorMeter
from .program import ConvUnit, SBPProgram, check_unit_layers
from .state import SBPState

__all__ = ['SBPConfig', 'RowMaskSampler', 'SBPIteration', 'SavedTensorMeter', 'ConvUnit',
           'SBPProgram', 'check_unit_layers', 'SBPState']
