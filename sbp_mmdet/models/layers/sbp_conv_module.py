"""mmcv's ``ConvModule`` as an SBP layer (necks and heads build their convs with it)."""
from mmcv.cnn import ConvModule
from torch import nn

from ...sbp import RowLocal, SBPLayerMixin, SBPProgram, Unit, conv_unit

_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)


class SBPConvModule(SBPLayerMixin, ConvModule):
    """mmcv's ``ConvModule`` as an SBP layer (``adopt``).

    Supports the order conv -> norm -> act with a plain conv, an optional
    BatchNorm or GroupNorm and an optional elementwise activation (ReLU, GELU, SiLU,
    LeakyReLU, Sigmoid, Tanh). A call with ``activate=False`` or
    ``norm=False`` runs densely.
    """

    def build_sbp_program(self) -> SBPProgram:
        return SBPProgram([conv_module_unit(self, 'conv', 'input', self.sbp_where)],
                          where=self.sbp_where)

    def sbp_runs_with(self, activate: bool = True, norm: bool = True) -> bool:
        return activate and norm


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
