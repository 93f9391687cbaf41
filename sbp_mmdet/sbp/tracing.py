"""torch.fx tracing of SBP modules and layers: refused, naming them.

``torch.fx.symbolic_trace`` runs a module's forward once on proxies and
records it as a fixed graph. mmengine's ``efficient_conv_bn_eval``
(``turn_on_efficient_conv_bn_eval``, run by ``Runner.train`` for the config
key ``efficient_conv_bn_eval=[...]``) traces each module it names that way
and replaces the module's ``forward`` by the graph, conv + BatchNorm pairs
fused. An SBP module draws a new row mask in Python at every training
forward, and its SBP layers run their SBP program only while the module has
handed them that iteration's state. A graph traced once holds neither: the
trace fails on the mask's Python control flow (torch.fx's ``TraceError``),
or, traced in eval mode or through an SBP layer alone, it records the dense
path, and training would then run densely without a word. Tracing an SBP
module (``SBPModuleMixin.sbp_training``) or a layer that its module runs with
SBP (``mark_sbp_layers``) raises ``SBPTracingError`` instead, and the message
lists the dense submodules that can be traced. Dense layers of an SBP model
(e.g. ``ResNetSBP``'s dense last stage) trace as mmdet's do.

``torch.compile`` is not refused here: dynamo does not go through
``torch.fx.symbolic_trace`` (see docs/composition.md).
"""
from typing import Iterable, List

from torch import nn
from torch.fx import _symbolic_trace
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

ROUTE = ("mmengine's efficient_conv_bn_eval (config key efficient_conv_bn_eval=[...], "
         'turn_on_efficient_conv_bn_eval) traces every module it names')


class SBPTracingError(TypeError):
    """torch.fx was asked to trace an SBP module or layer."""


# torch >= 2.5 tells symbolic tracing apart from torch.compile's; older torch has one flag
fx_symbolic_tracing = getattr(_symbolic_trace, 'is_fx_symbolic_tracing',
                              _symbolic_trace.is_fx_tracing)
"""Whether ``torch.fx.symbolic_trace`` is tracing now (not ``torch.compile``)."""


def mark_sbp_layers(layers: Iterable[nn.Module]) -> None:
    """Mark ``layers`` as run with SBP by their module: tracing them is refused
    (``check_layer_not_traced``), and ``dense_submodules`` leaves them out."""
    for layer in layers:
        layer.sbp_layer = True


def is_sbp_layer(module: nn.Module) -> bool:
    """Whether ``module`` was marked by ``mark_sbp_layers``."""
    return bool(getattr(module, 'sbp_layer', False))


def dense_submodules(module: nn.Module) -> List[str]:
    """The children of ``module`` worth naming in efficient_conv_bn_eval: with
    conv and BatchNorm layers, parameters that train (not a frozen stage) and
    no SBP layer."""
    names = []
    for name, child in module.named_children():
        inner = list(child.modules())
        if (any(isinstance(m, _ConvNd) for m in inner)
                and any(isinstance(m, _BatchNorm) for m in inner)
                and any(p.requires_grad for p in child.parameters())
                and not any(is_sbp_layer(m) for m in inner)):
            names.append(name)
    return names


def check_module_not_traced(module: nn.Module, name: str) -> None:
    """Refuse torch.fx tracing of the SBP module ``module`` (called ``name``).

    Raises:
        SBPTracingError: while ``torch.fx.symbolic_trace`` traces it, naming
            it, the reason and its dense submodules.
    """
    if not fx_symbolic_tracing():
        return
    dense = dense_submodules(module)
    if dense:
        instead = (f'name its dense submodules instead: {dense} (as a detector\'s backbone: '
                   f"efficient_conv_bn_eval={['backbone.' + d for d in dense]})")
    else:
        instead = 'it has no dense trainable submodule with conv + BatchNorm: leave it out'
    raise SBPTracingError(
        f'{name}: torch.fx cannot trace an SBP module: it draws a new row mask at every '
        'training forward, so a graph traced once would fail on that Python control flow '
        f'or record the dense path and silently train densely. {ROUTE}: {instead} '
        '(docs/composition.md).')


def check_layer_not_traced(layer: nn.Module) -> None:
    """Refuse torch.fx tracing of ``layer`` if its module runs it with SBP.

    Raises:
        SBPTracingError: while ``torch.fx.symbolic_trace`` traces an SBP
            layer, naming it (``sbp_where``).
    """
    if not (is_sbp_layer(layer) and fx_symbolic_tracing()):  # the flag first: every forward asks
        return
    where = getattr(layer, 'sbp_where', type(layer).__name__)
    raise SBPTracingError(
        f'{where}: torch.fx cannot trace a layer that runs with SBP: the traced graph would '
        'hold its dense forward and replace it, so it would silently train densely. '
        f'{ROUTE}: name only submodules without SBP layers (e.g. a dense last stage, '
        "'backbone.layer4' for ResNetSBP's default stages), or turn SBP off for this "
        'stage with sbp.stages (docs/composition.md).')
