"""mmpretrain's ``ConvNeXt``, importable where torchvision is not.

Why this exists: ``import mmpretrain.models`` imports torchvision (for the
metrics of its classification heads), which mmpretrain does not declare and
which has no CPU build matching torch 2.13 on some machines (a CUDA build
fails to load its ops). The ConvNeXt backbone itself needs neither: where the
package import fails on torchvision only, this module loads
``mmpretrain/models/backbones/convnext.py`` on its own (the packages above it
stand in as empty namespaces while it loads), registering ``ConvNeXt`` in
mmpretrain's ``MODELS`` registry as usual, and marks that registry as imported so
that ``type='mmpretrain.ConvNeXt'`` resolves without re-importing the package.

When it can go: once torchvision is part of the pinned stack.
"""
import importlib
import os
import sys
import types

from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS

CONVNEXT_MODULE = 'mmpretrain.models.backbones.convnext'


def _import_without_package_init(name: str) -> types.ModuleType:
    """Import module ``name`` with its parent packages standing in as namespaces."""
    root = os.path.dirname(importlib.import_module('mmpretrain').__file__)
    parents = name.split('.')[1:-1]
    stand_ins = {}
    for depth in range(1, len(parents) + 1):
        package = '.'.join(['mmpretrain', *parents[:depth]])
        stand_ins[package] = types.ModuleType(package)
        stand_ins[package].__path__ = [os.path.join(root, *parents[:depth])]
    saved = {package: sys.modules.pop(package, None) for package in stand_ins}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module(name)
    finally:
        for package, module in saved.items():
            sys.modules.pop(package)
            if module is not None:
                sys.modules[package] = module


try:
    importlib.import_module('mmpretrain.models')
    _convnext = importlib.import_module(CONVNEXT_MODULE)
except ModuleNotFoundError as error:  # depends on the machine
    if error.name != 'torchvision':
        raise
    _convnext = _import_without_package_init(CONVNEXT_MODULE)
    MMPRETRAIN_MODELS._imported = True  # its package import would fail on torchvision

ConvNeXt = _convnext.ConvNeXt
ConvNeXtBlock = _convnext.ConvNeXtBlock
LayerNorm2d = MMPRETRAIN_MODELS.get('LN2d')  # the norm of ConvNeXt's default norm_cfg

__all__ = ['ConvNeXt', 'ConvNeXtBlock', 'LayerNorm2d']
