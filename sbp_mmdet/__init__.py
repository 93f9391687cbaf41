"""sbp-mmdet: Stochastic Backpropagation for MMDetection.

Importing this package registers its modules in the mmdet/mmengine registries,
so configs only need ``custom_imports=dict(imports=['sbp_mmdet'])``.
"""
from .version import __version__

__all__ = ['__version__']
