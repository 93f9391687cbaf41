"""Let mmengine's own checkpoints load under ``torch.load``'s ``weights_only`` default.

Why this exists: since torch 2.6, ``torch.load`` defaults to ``weights_only=True``
and unpickles only allow-listed types. mmengine 0.10.7 calls ``torch.load``
without ``weights_only``, and its checkpoints hold more than tensors: the
message hub's ``HistoryBuffer`` objects (with numpy arrays inside, and their
statistics methods pickled as ``getattr(HistoryBuffer, 'mean')``) and numpy
scalars. So ``tools/train.py --resume`` and ``tools/test.py`` fail with
"Weights only load failed".

The fix allow-lists exactly those types with
``torch.serialization.add_safe_globals``: checkpoints load as before, and a
checkpoint still cannot run arbitrary code while loading (switching
``weights_only`` off for every load would give that up).

When it can go: once mmengine passes ``weights_only`` itself, or if the
project pins torch < 2.6. ``tests/test_tools.py::test_compat_fix_is_still_needed``
fails as soon as the fix is no longer needed.
"""
import builtins
from typing import Callable, List

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

# numpy dtypes that logged scalars and HistoryBuffer arrays can have
_NUMPY_SCALAR_TYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                       np.uint32, np.uint64, np.float16, np.float32, np.float64)


def mmengine_checkpoint_globals() -> List[Callable]:
    """The types, besides tensors, that mmengine checkpoints pickle."""
    return [
        HistoryBuffer,  # message_hub.log_scalars
        # HistoryBuffer._statistics_methods holds getattr(HistoryBuffer, 'min') etc. The
        # restricted unpickler still calls only allow-listed callables, so getattr can
        # read attributes of allowed objects but not run what it finds.
        builtins.getattr,
        np.core.multiarray._reconstruct,  # numpy arrays
        np.ndarray,
        np.dtype,
        np.core.multiarray.scalar,  # numpy scalars
        *(type(np.dtype(t)) for t in _NUMPY_SCALAR_TYPES),  # e.g. numpy.dtypes.Float64DType
    ]


def allow_mmengine_checkpoints() -> None:
    """Allow-list :func:`mmengine_checkpoint_globals` for ``weights_only`` loads.

    A no-op on torch < 2.4, which has no allow-list (nor the ``weights_only``
    default).
    """
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
