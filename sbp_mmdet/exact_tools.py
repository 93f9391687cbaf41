"""The exact memory savers that are switched on after the model is built.

Three config keys name module paths of the model (``'backbone.layer4'``):

- ``efficient_conv_bn_eval`` (mmengine): ``Runner.train`` calls
  ``mmengine.model.efficient_conv_bn_eval.turn_on_efficient_conv_bn_eval``, which traces each
  module with torch.fx and folds every conv + frozen BatchNorm pair into one convolution;
- ``activation_checkpointing`` (mmengine): ``Runner.train`` calls
  ``mmengine.runner.turn_on_activation_checkpointing``, which wraps each module's forward in
  torch's reentrant ``checkpoint`` (a module whose inputs need no gradient then gets none);
- ``selective_checkpointing`` (ours, torch's selective activation checkpointing): each
  module's forward runs under the non-reentrant ``checkpoint`` with
  ``create_selective_checkpoint_contexts``: convolution outputs are saved, the rest (BatchNorm,
  ReLU, additions) is recomputed in backward. ``tools/train.py`` applies it to the built
  model; mmengine has no such key.

``apply_exact_tools`` applies them in ``Runner.train``'s order with mmengine's own functions,
after refusing what would not be exact: a checkpointed module that holds SBP layers (their
SBP program runs only inside their module's forward; SBP's ``sbp.recompute`` is the way to
recompute them), two tools on overlapping modules (the later one replaces the earlier one's
forward), and ``efficient_conv_bn_eval`` with mmdet's ``with_cp`` blocks (torch.fx cannot
trace their ``x.requires_grad`` branch). ``efficient_conv_bn_eval`` on an SBP module is refused
by the module itself (``sbp_mmdet.sbp.tracing``).
"""
import contextlib
import functools
from operator import attrgetter
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from .sbp.tracing import is_sbp_layer

ECBE = 'efficient_conv_bn_eval'
ACT_CKPT = 'activation_checkpointing'
SAC = 'selective_checkpointing'
# the keys in the order Runner.train applies them (selective checkpointing last: ours)
KEYS = (ACT_CKPT, ECBE, SAC)
CHECKPOINTING = (ACT_CKPT, SAC)
# what selective checkpointing saves; every other op is recomputed in backward
SAVED_OPS = (torch.ops.aten.convolution.default,)
# who is told of the tensors selective checkpointing keeps (``observe_selective_saves``)
_OBSERVERS: List[Callable[[torch.Tensor], Any]] = []


class ExactToolError(ValueError):
    """An exact tool asked on modules where it would not be exact; the message says why."""


def tool_modules(options: Mapping[str, Any]) -> Dict[str, List[str]]:
    """Config key -> module paths, for the keys of ``KEYS`` that ``options`` sets."""
    out = {}
    for key in KEYS:
        value = options.get(key)
        if value:
            out[key] = [value] if isinstance(value, str) else list(value)
    return out


def check_exact_tools(model: nn.Module, options: Mapping[str, Any]) -> None:
    """Refuse the tools of ``options`` where they would not be exact on ``model``.

    Raises:
        ExactToolError: naming the key, the module and the reason.
    """
    tools = tool_modules(options)
    named = [(key, path) for key, paths in tools.items() for path in paths]
    for key, path in named:
        module = _module(model, path, key)
        if key in CHECKPOINTING and any(is_sbp_layer(m) for m in module.modules()):
            raise ExactToolError(
                f'{key}: {path} holds layers that run with SBP; a checkpoint would re-run '
                'them in backward outside their module\'s SBP forward, so it is refused. '
                'SBP recomputes its own blocks with sbp.recompute=True (the recompute token); '
                'checkpoint only dense parts (e.g. backbone.layer4).')
        if key == ECBE and any(getattr(m, 'with_cp', False) for m in module.modules()):
            raise ExactToolError(
                f'{ECBE}: {path} has blocks with mmdet\'s with_cp=True, whose forward branches '
                'on x.requires_grad in Python, which torch.fx cannot trace; use one of the two '
                'on these blocks.')
    for i, (key, path) in enumerate(named):
        for other_key, other in named[i + 1:]:
            if _overlap(path, other):
                raise ExactToolError(
                    f'{key}={path!r} and {other_key}={other!r} overlap: each replaces the '
                    "module's forward, so one would silently undo the other; name disjoint "
                    'modules.')


def apply_exact_tools(model: nn.Module, options: Mapping[str, Any]) -> None:
    """Switch on the tools of ``options`` on ``model`` (checked by ``check_exact_tools``), as
    ``Runner.train`` does: activation checkpointing, then efficient_conv_bn_eval, with
    mmengine's functions; then selective checkpointing."""
    from mmengine.model.efficient_conv_bn_eval import turn_on_efficient_conv_bn_eval
    from mmengine.runner import turn_on_activation_checkpointing
    check_exact_tools(model, options)
    tools = tool_modules(options)
    if ACT_CKPT in tools:
        turn_on_activation_checkpointing(model, tools[ACT_CKPT])
    if ECBE in tools:
        turn_on_efficient_conv_bn_eval(model, tools[ECBE])
    if SAC in tools:
        turn_on_selective_checkpointing(model, tools[SAC])


def prepare_training(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Before ``Runner.train``: refuse the config's tools where they would not be exact on
    ``model`` (the Runner's model, unwrapped) and switch on selective checkpointing, which
    the Runner does not know; the Runner then applies its own two keys."""
    if tool_modules(cfg):
        check_exact_tools(model, cfg)
    if cfg.get(SAC):
        turn_on_selective_checkpointing(model, tool_modules(cfg)[SAC])


def save_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective-checkpointing policy: keep convolution outputs, recompute the rest."""
    return (CheckpointPolicy.MUST_SAVE if op in SAVED_OPS
            else CheckpointPolicy.PREFER_RECOMPUTE)


def turn_on_selective_checkpointing(model: nn.Module, modules: Sequence[str]) -> None:
    """Run each of ``modules`` (paths in ``model``) under torch's selective activation
    checkpointing with ``save_convolutions``."""
    for path in modules:
        module = _module(model, path, SAC)
        module.forward = _selective(module.forward)


@contextlib.contextmanager
def observe_selective_saves(observer: Callable[[torch.Tensor], Any]) -> Iterator[None]:
    """Tell ``observer`` every tensor that selective checkpointing keeps for backward
    inside the ``with`` block: the checkpointed modules' inputs and the saved convolution
    outputs. torch keeps them in the checkpoint's own storage, out of the reach of
    ``saved_tensors_hooks`` (``SavedTensorMeter`` would not see them)."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


class _ReportSaves(TorchDispatchMode):
    """Reports the outputs of ``SAVED_OPS`` to the observers (the forward pass only)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SAVED_OPS:
            _report(out)
        return out


@contextlib.contextmanager
def _forward_context(caching: contextlib.AbstractContextManager) -> Iterator[None]:
    with caching, _ReportSaves():  # the reporter innermost: it sees what is cached
        yield


def _contexts():
    forward, recompute = create_selective_checkpoint_contexts(save_convolutions)
    return (_forward_context(forward) if _OBSERVERS else forward), recompute


def _report(*tensors: Any) -> None:
    for tensor in tensors:
        if torch.is_tensor(tensor):
            for observer in _OBSERVERS:
                observer(tensor)


def _selective(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        _report(*args)  # the checkpoint keeps its inputs for the recompute
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts,
                          **kwargs)
    return wrapper


def _module(model: nn.Module, path: str, key: str) -> nn.Module:
    try:
        return attrgetter(path)(model)
    except AttributeError:
        raise ExactToolError(f'{key}: the model has no module {path!r}') from None


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + '.') or b.startswith(a + '.')
