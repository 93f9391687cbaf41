"""Device-independent measure of activation memory: bytes saved for backward."""
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Set

import torch
from torch import nn


class SavedTensorMeter:
    """Counts the bytes of tensors autograd saves for backward.

    Every storage is counted once (views of one storage and tensors saved by
    several nodes are not double counted) and parameters and buffers are
    excluded, so the figure is the activation memory a training step keeps
    alive between its forward and backward passes, whatever the device.

    With ``components`` (name -> submodule), bytes are also attributed to the
    component whose forward was running when the tensor was first saved.

    Args:
        model (nn.Module): the model whose parameters are excluded.
        components (dict, optional): named submodules to attribute bytes to.
    """

    def __init__(self, model: nn.Module, components: Optional[Dict[str, nn.Module]] = None):
        self.exclude: Set[int] = {t.untyped_storage().data_ptr() for t in
                                  list(model.parameters()) + list(model.buffers())}
        self.components = dict(components or {})
        self.storages: Set[int] = set()
        self.total_bytes = 0
        self.by_component: Dict[str, int] = defaultdict(int)
        self._active = ['other']

    def count(self, tensor: torch.Tensor) -> None:
        """Count ``tensor`` as saved for backward (for storage autograd's hooks do not see,
        e.g. a non-reentrant checkpoint's)."""
        self._pack(tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude and key not in self.storages and storage.nbytes() > 0:
            self.storages.add(key)
            self.total_bytes += storage.nbytes()
            self.by_component[self._active[-1]] += storage.nbytes()
        return tensor

    def _enter(self, name: str) -> None:
        self._active.append(name)

    def _leave(self) -> None:
        self._active.pop()

    @contextmanager
    def measure(self) -> Iterator['SavedTensorMeter']:
        """Count what is saved inside the ``with`` block."""
        handles = []
        for name, module in self.components.items():
            handles.append(module.register_forward_pre_hook(
                lambda *_, name=name: self._enter(name)))
            handles.append(module.register_forward_hook(lambda *_: self._leave()))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    @property
    def mebibytes(self) -> float:
        return self.total_bytes / 2**20
