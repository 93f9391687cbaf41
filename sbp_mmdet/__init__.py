"""sbp-mmdet: Stochastic Backpropagation for MMDetection.

Importing this package registers its modules in the mmdet/mmengine registries,
so configs only need ``custom_imports=dict(imports=['sbp_mmdet'])``.
"""
from . import datasets  # noqa: F401
from . import engine  # noqa: F401  (registers CPUDistributedDataParallel)
from . import hooks  # noqa: F401  (registers SBPHook)
from . import models  # noqa: F401  (registers ResNetSBP, FPNSBP)
from . import utils  # noqa: F401
from .compat import allow_mmengine_checkpoints
from .version import __version__

allow_mmengine_checkpoints()

__all__ = ['__version__']
