"""The SBP mechanism shared by every SBP backbone and neck.

- ``config``: the ``sbp=dict(...)`` settings, each with one owner: mask
  keys for the module that draws the mask, layer keys (and per-group
  overrides) for each SBP module.
- ``policies``: mask policies (``grid``, ``random``, ``objects``), a
  registry of them (``register_mask_policy``) and what they draw from.
- ``masks``: row keep masks, one base mask per iteration (shared or per
  image) at the coarsest SBP stride, replicated to finer strides.
- ``rows``: convolutions at a subset of output rows (bands with halos).
- ``norm``: BatchNorm and GroupNorm at packed rows with full-map statistics.
- ``ops``: what a unit is made of: a row-mixing op (a conv, an average
  pool, a channel linear layer, non-overlapping patches, or none) and a tail of row-local ops
  (norms, activations, 1x1 convs, adds, channel slices and concatenations,
  layer scale, DropPath).
- ``program``: SBP units and the autograd function that runs a block of them
  (SBP's backward on kept rows, or ``exact_input_grad``: exact activation
  gradients, parameters learning on kept rows).
- ``bitmask``: boolean maps at one bit per element (ReLU signs for
  ``exact_input_grad``).
- ``context``: ``SBPFeatures``, feature maps carrying the iteration's mask
  and their strides from one SBP module to the next.
- ``layer``: ``SBPLayerMixin`` and ``adopt``, the one mechanism that turns
  a built module (a block, a conv module) into a layer run with SBP.
- ``module``: ``SBPModuleMixin``, what every SBP backbone, neck and head
  shares.
- ``memory``: bytes saved for backward, the device-independent measure.
- ``tracing``: torch.fx tracing (mmengine's ``efficient_conv_bn_eval``) of
  SBP modules and layers, refused with ``SBPTracingError``.
"""
from .config import LayerConfig, MaskConfig, SBPSettings, parse_sbp
from .context import SBPFeatures
from .layer import SBPLayerMixin, adopt
from .masks import RowMaskSampler, SBPIteration
from .memory import SavedTensorMeter
from .module import SBPBackboneMixin, SBPModuleMixin
from .norm import BatchNorm, GroupNorm, norm_op
from .ops import (Add, ChannelsLast, ChannelSlice, Concat, ConvMix, DropPath, IdentityMix,
                  LayerScale, LinearMix, PoolMix, RowLocal, TailOp, UnfoldMix, relu)
from .policies import (MASK_POLICIES, MaskPolicy, MaskRequest, fill_to_equal_counts,
                       register_mask_policy)
from .program import SBPProgram, Unit, conv_unit
from .state import SBPState
from .tracing import SBPTracingError

__all__ = ['MaskConfig', 'LayerConfig', 'SBPSettings', 'parse_sbp', 'SBPLayerMixin', 'adopt',
           'MASK_POLICIES', 'MaskPolicy', 'MaskRequest', 'register_mask_policy',
           'fill_to_equal_counts', 'RowMaskSampler', 'SBPIteration', 'SavedTensorMeter', 'Unit',
           'conv_unit', 'SBPProgram', 'SBPState', 'SBPFeatures', 'SBPModuleMixin',
           'SBPBackboneMixin', 'SBPTracingError', 'ConvMix', 'LinearMix',
           'PoolMix', 'UnfoldMix', 'IdentityMix', 'TailOp', 'BatchNorm', 'GroupNorm', 'norm_op',
           'RowLocal', 'ChannelsLast',
           'LayerScale', 'Add', 'ChannelSlice', 'Concat', 'DropPath', 'relu']
