"""Which mmdet backbones have an SBP version, and the errors naming them."""
from typing import Any, Dict, Optional

# mmdet (or mmpretrain) backbone type -> its SBP version. One line per backbone.
SBP_BACKBONES: Dict[str, str] = {
    'ResNet': 'ResNetSBP',
    'ResNetV1d': 'ResNetV1dSBP',
    'ResNeXt': 'ResNeXtSBP',
    'RegNet': 'RegNetSBP',
    'Res2Net': 'Res2NetSBP',
    'ConvNeXt': 'ConvNeXtSBP',  # mmpretrain's (type='mmpretrain.ConvNeXt' in mmdet configs)
    'SwinTransformer': 'SwinTransformerSBP',
}


def supported_backbones() -> str:
    """``'ResNet -> ResNetSBP, ...'``, for error messages."""
    return ', '.join(f'{dense} -> {sbp}' for dense, sbp in SBP_BACKBONES.items())


def type_name(module_type: Any) -> Optional[str]:
    """The class name a config ``type`` names (``'mmdet.ResNet'`` -> ``'ResNet'``)."""
    if isinstance(module_type, type):
        return module_type.__name__
    return module_type.split('.')[-1] if isinstance(module_type, str) else None


def is_sbp_backbone(module_type: Any) -> bool:
    """Whether the registered class ``module_type`` names is an SBP module
    (one of ``SBP_BACKBONES`` or a user-made ``SBPModuleMixin`` subclass)."""
    from mmdet.registry import MODELS

    from ..sbp import SBPModuleMixin
    if type_name(module_type) in SBP_BACKBONES.values():
        return True
    try:
        cls = module_type if isinstance(module_type, type) else MODELS.get(module_type or '')
    except ImportError:  # a scope whose package fails to import: not one of ours
        return False
    return isinstance(cls, type) and issubclass(cls, SBPModuleMixin)


def no_sbp_backbone_message(module_type: Any, why: str) -> str:
    """The error for ``why`` (e.g. an ``sbp`` key) on the dense backbone ``module_type``."""
    name = type_name(module_type)
    if name in SBP_BACKBONES:
        fix = f"use type='{SBP_BACKBONES[name]}', its SBP version"
    else:
        fix = f'{name} has no SBP version'
    return (f'backbone {name}: {why}, but {fix}. SBP backbones (mmdet type -> SBP type): '
            f'{supported_backbones()}')
