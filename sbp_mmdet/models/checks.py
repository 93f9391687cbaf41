"""Checks that need a whole detector config, not one module's."""
from typing import Any, Mapping, Optional

from ..sbp import SBPConfig
from .necks import FPNSBP

# The settings of an FPNSBP behind an SBP backbone that must equal the backbone's:
# the neck uses the backbone's mask.
SHARED_KEYS = ('keep_ratio', 'sampling')
# SBP backbones and their own sbp keys
BACKBONE_KEYS = {'ResNetSBP': ('stages', 'blocks'),
                 'ConvNeXtSBP': ('stages', 'blocks', 'downsample')}


def _is(module_cfg: Any, name: str) -> bool:
    module_type = module_cfg.get('type') if isinstance(module_cfg, Mapping) else None
    if isinstance(module_type, type):
        module_type = module_type.__name__
    return isinstance(module_type, str) and module_type.split('.')[-1] == name


def neck_disagreement(key: str, neck_value: Any, backbone_value: Any) -> str:
    """The message for an FPNSBP setting that differs from its backbone's."""
    return (f'FPNSBP: sbp.{key}={neck_value!r} disagrees with the backbone '
            f"({backbone_value!r}); the neck uses the backbone's mask: drop the key or make "
            'them equal')


def sbp_model_problem(model_cfg: Mapping) -> Optional[str]:
    """What in a detector config makes its SBP backbone and neck disagree.

    An ``FPNSBP`` neck behind an SBP backbone (``BACKBONE_KEYS``) uses the backbone's
    mask, so a ``keep_ratio`` or ``sampling`` given in the neck's ``sbp`` must
    equal the backbone's (defaults applied). Without this check the
    disagreement surfaces at the first training forward. Bad ``sbp`` settings
    of either module (what building it would refuse) are reported too.

    Args:
        model_cfg (Mapping): the ``model`` section of a config.

    Returns:
        str, optional: the problem, None when there is none (or the detector
        has no SBP backbone + ``FPNSBP`` pair).
    """
    backbone, neck = model_cfg.get('backbone'), model_cfg.get('neck')
    name = next((name for name in BACKBONE_KEYS if _is(backbone, name)), None)
    if name is None or not _is(neck, 'FPNSBP'):
        return None
    neck_sbp = neck.get('sbp') or {}
    try:
        backbone_sbp, _ = SBPConfig.from_dict(backbone.get('sbp'), BACKBONE_KEYS[name], name)
        SBPConfig.from_dict(neck_sbp, FPNSBP.sbp_extra_keys, 'FPNSBP')
    except (KeyError, TypeError, ValueError) as err:  # what building the modules would raise
        return str(err.args[0])
    for key in SHARED_KEYS:
        if key in neck_sbp and neck_sbp[key] != getattr(backbone_sbp, key):
            return neck_disagreement(key, neck_sbp[key], getattr(backbone_sbp, key))
    return None
