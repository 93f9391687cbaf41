"""SBP layers: the one mechanism that turns a built module into one that runs with SBP.

An SBP layer is a module (a residual block, a conv module, a downsampling
layer) that its SBP module runs as an ``SBPProgram`` while it hands the layer
an ``SBPState``, and as its own class's forward otherwise. Its class subclasses
``SBPLayerMixin`` before the layer's class and declares its program in
``build_sbp_program``; ``adopt`` turns a built module of that class into it,
in place: same parameters, buffers and ``state_dict`` keys.
"""
from typing import Any, Callable, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor, nn

from .config import LayerConfig
from .program import SBPProgram
from .state import SBPState
from .tracing import check_layer_not_traced, mark_sbp_layers


class SBPLayerMixin:
    """Runs a layer as its SBP program while ``sbp_state`` is set.

    A subclass declares ``build_sbp_program``; ``sbp_program`` builds it once
    and caches it, rebuilding only when the layer's submodules change (e.g.
    BatchNorm converted to SyncBatchNorm). A layer whose forward takes more
    than the input overrides ``sbp_runs_with`` to say when it runs with SBP.

    Attributes:
        sbp_state (SBPState, optional): set by the SBP module for one forward.
        sbp_cfg (LayerConfig): the layer settings its module gave it.
        sbp_where (str): the layer's name in errors.
    """

    sbp_state: Optional[SBPState] = None
    sbp_cfg: LayerConfig = LayerConfig()
    sbp_where: str = ''

    def build_sbp_program(self) -> SBPProgram:
        """The layer as an SBP program.

        Raises:
            TypeError: for what SBP cannot run, naming ``sbp_where``.
        """
        raise NotImplementedError

    def sbp_program(self) -> SBPProgram:
        """The layer's program, built once per structure."""
        return cached_program(self, self.build_sbp_program)

    def sbp_runs_with(self, *args: Any, **kwargs: Any) -> bool:
        """Whether a call with these arguments besides the input runs with SBP
        while the module hands the layer a state (a layer whose forward takes
        more than the input overrides it)."""
        return True

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.sbp_state is None or not self.sbp_runs_with(*args, **kwargs):
            check_layer_not_traced(self)  # torch.fx would record the dense path
            return super().forward(x, *args, **kwargs)
        return self.sbp_state.run(self.sbp_program(), x, self.sbp_cfg)


T = TypeVar('T')


@torch.compiler.disable  # dynamo cannot trace id(); the lookup runs eagerly
def cached_program(module: nn.Module, build: Callable[[], T]) -> T:
    """``build()`` (a program), cached on ``module`` until its submodules change.

    A program holds the module's submodules (convs, norms); it is rebuilt when
    one of them is replaced (the cache key is their identities).
    """
    key = tuple(map(id, module.modules()))
    cache: Optional[Tuple[tuple, T]] = module.__dict__.get('_sbp_program_cache')
    if cache is None or cache[0] != key:
        cache = (key, build())
        module.__dict__['_sbp_program_cache'] = cache
    return cache[1]


def dense_class(cls: type, mixin: type) -> type:
    """The class ``cls`` adds SBP to: the first class of its MRO that is not a
    subclass of ``mixin`` (``SBPBottleneck`` -> mmdet's ``Bottleneck``)."""
    return next(c for c in cls.__mro__ if not issubclass(c, mixin))


def adopt(module: nn.Module, sbp_classes: Sequence[type], where: str,
          cfg: LayerConfig) -> nn.Module:
    """Turn the built ``module`` into the SBP layer class made for its class, in place.

    The module keeps its parameters, buffers and ``state_dict`` keys; its
    class becomes the one of ``sbp_classes`` whose dense class is exactly the
    module's, it is marked as an SBP layer (torch.fx may not trace it), and
    its program is built now, so that what SBP cannot run fails at build time.

    Args:
        module: the layer, as its model built it.
        sbp_classes: the SBP layer classes the calling module supports.
        where: the layer's name in errors (``ResNetSBP.layer2.0``).
        cfg: the layer settings it runs with.

    Raises:
        TypeError: when no class of ``sbp_classes`` is made for the module's
            class, or for what SBP cannot run, naming ``where``.
    """
    by_dense = {dense_class(c, SBPLayerMixin): c for c in sbp_classes}
    sbp_class = by_dense.get(type(module))
    if sbp_class is None:
        supported = ', '.join(f'{c.__module__}.{c.__qualname__}' for c in by_dense)
        raise TypeError(f'{where}: layer class {type(module).__module__}.'
                        f'{type(module).__qualname__} has no SBP version here (SBP supports '
                        f'{supported}); turn SBP off for it (a backbone: sbp.stages or sbp.blocks)')
    module.__class__ = sbp_class
    module.sbp_where = where
    module.sbp_cfg = cfg
    mark_sbp_layers([module])
    program = module.sbp_program()
    if cfg.exact_input_grad:
        program.check_exact_input_grad(where, modes=False)
    return module
