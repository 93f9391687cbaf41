"""Memoised row bookkeeping: the index work of a row set is done once.

SBP's backward works on row sets: which input rows a convolution reads, the
runs of consecutive rows (bands), where rows sit in a packed tensor. That
bookkeeping runs on small integer tensors on the CPU, dozens of operators per
layer; done afresh at every step it would dispatch more operators than the
network's own layers (on a GPU, host time between kernel launches). Row sets
repeat: a grid mask with a random offset takes a handful of layouts per image
size. So every function of row sets here is computed once per distinct input
and then looked up, keyed by the rows' values (``row_key``), in a bounded LRU
cache per function.

The cached results are shared: callers must not write into them (none does:
row tensors are only read, as indices). Their copies on a GPU are cached with
them (``to_device``), so a layout's indices move to the device once.
"""
import functools
from array import array
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, List, Tuple, TypeVar

import torch
from torch import Tensor

#: distinct inputs remembered per function (a layout is a few dozen entries)
CACHE_SIZE = 4096

_KEY = '_sbp_row_key'
_ON_DEVICE = '_sbp_on_device'

Fn = TypeVar('Fn', bound=Callable[..., Any])


def row_key(rows: Tensor) -> Hashable:
    """A hashable key of the values of ``rows`` (a CPU index tensor), remembered
    on the tensor: row tensors are never written after they are made."""
    key = getattr(rows, _KEY, None)
    if key is None:
        if rows.is_floating_point() or rows.is_complex():
            raise TypeError(f'row_key: expected an index or mask tensor, got {rows.dtype}')
        # tolist reads the values without dispatching an operator; 8 bytes per value
        key = (rows.dtype, tuple(rows.shape), array('q', _flat(rows.tolist())).tobytes())
        setattr(rows, _KEY, key)
    return key


def _flat(values: Any) -> List[int]:
    """The values of a nested list (``Tensor.tolist()``) in order."""
    if not isinstance(values, list):
        return [values]
    return [v for value in values for v in _flat(value)] if values and isinstance(
        values[0], list) else values


def same_rows(a: Tensor, b: Tensor) -> bool:
    """Whether two row tensors hold the same rows (``torch.equal`` without an operator)."""
    return a is b or row_key(a) == row_key(b)


def memoised(fn: Fn) -> Fn:
    """Memoise ``fn``, a pure function of CPU index tensors and hashable values.

    Tensor arguments are keyed by their values (``row_key``); the result is
    returned as it was computed the first time (shared: do not write into it).
    """
    cache: 'OrderedDict[Tuple[Hashable, ...], Any]' = OrderedDict()

    @functools.wraps(fn)
    def lookup(*args: Any) -> Any:
        key = tuple(row_key(a) if isinstance(a, Tensor) else a for a in args)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = fn(*args)
        cache[key] = value
        if len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        return value

    lookup.cache = cache  # type: ignore[attr-defined]
    return lookup  # type: ignore[return-value]


def to_device(index: Tensor, device: torch.device) -> Tensor:
    """``index`` (row indices or a row mask, kept on the CPU) on ``device``.

    The copy is made once per index tensor and device and remembered on the
    tensor (cached index tensors move once). To a GPU it goes through pinned
    memory and does not block: a plain ``.to(device)`` from pageable memory
    makes the host wait for every kernel already queued on the stream.
    PyTorch's pinned-memory cache keeps the staging buffer until the copy has run.
    """
    if index.device == device:
        return index
    copies: Dict[torch.device, Tensor] = getattr(index, _ON_DEVICE, None) or {}
    copy = copies.get(device)
    if copy is None:
        if device.type == 'cuda':
            copy = index.pin_memory().to(device, non_blocking=True)
        else:
            copy = index.to(device)
        copies[device] = copy
        setattr(index, _ON_DEVICE, copies)
    return copy
