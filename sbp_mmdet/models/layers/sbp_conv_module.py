"""mmcv's ``ConvModule`` as an SBP layer (necks and heads build their convs with it)."""
from typing import Optional

from mmcv.cnn import ConvModule
from torch import Tensor, nn

from ...sbp import RowLocal, SBPProgram, SBPState, Unit, conv_unit
from ...sbp.tracing import check_layer_not_traced, mark_sbp_layers

_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)


class SBPConvModule(ConvModule):
    """``ConvModule`` that runs as an SBP unit while ``sbp_state`` is set.

    Supports the order conv -> norm -> act with a plain conv, an optional
    BatchNorm and an optional elementwise activation (ReLU, GELU, SiLU,
    LeakyReLU, Sigmoid, Tanh).
    """

    sbp_state: Optional[SBPState] = None

    @classmethod
    def adopt(cls, module: ConvModule, where: str) -> 'SBPConvModule':
        """Turn a built ``ConvModule`` into this class in place (same weights).

        The module is marked as an SBP layer: torch.fx may not trace it
        (``sbp_mmdet.sbp.tracing``).

        Raises:
            TypeError: for a layer SBP cannot run, naming ``where`` (at build
                time, not at the first training forward).
        """
        if type(module) is not ConvModule:
            raise TypeError(f'{where}: expected a ConvModule, got {type(module).__name__}')
        module.__class__ = cls
        module.sbp_where = where
        mark_sbp_layers([module])
        module.sbp_program()
        return module

    def sbp_program(self) -> SBPProgram:
        """The layer as an SBP unit."""
        where = getattr(self, 'sbp_where', type(self).__name__)
        return SBPProgram([conv_module_unit(self, 'conv', 'input', where)], where=where)

    def forward(self, x: Tensor, activate: bool = True, norm: bool = True) -> Tensor:
        if self.sbp_state is None or not (activate and norm):
            check_layer_not_traced(self)  # torch.fx would record the dense path
            return super().forward(x, activate, norm)
        return self.sbp_state.run(self.sbp_program(), x)


def conv_module_unit(module: ConvModule, name: str, source: str, where: str) -> Unit:
    """A ``ConvModule`` (conv -> norm -> act) as the unit ``name`` reading ``source``.

    Raises:
        TypeError: for what SBP cannot run, naming ``where``.
    """
    if module.order != ('conv', 'norm', 'act') or module.with_explicit_padding:
        raise TypeError(f'{where}: SBP needs order conv-norm-act and zero padding')
    if module.with_activation and not isinstance(module.activate, _ACTIVATIONS):
        raise TypeError(f'{where}: SBP supports elementwise activations '
                        f'{[a.__name__ for a in _ACTIVATIONS]}, '
                        f'got {type(module.activate).__name__}')
    unit = conv_unit(name, source, module.conv, module.norm if module.with_norm else None,
                     where=where)
    return unit.with_tail(RowLocal(module.activate)) if module.with_activation else unit
