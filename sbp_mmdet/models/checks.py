"""Checks that need a whole detector config, not one module's."""
from typing import Any, Mapping, Optional

from ..sbp import SBPConfig

# The settings of an FPNSBP behind a ResNetSBP that must equal the backbone's:
# the neck uses the backbone's mask.
SHARED_KEYS = ('keep_ratio', 'sampling', 'per_image')


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

    An ``FPNSBP`` neck behind a ``ResNetSBP`` backbone uses the backbone's
    mask, so a ``keep_ratio``, ``sampling`` or ``per_image`` given in the neck's ``sbp`` must
    equal the backbone's (defaults applied). Without this check the
    disagreement surfaces at the first training forward. Bad ``sbp`` settings
    of either module (what building it would refuse) are reported too.

    Args:
        model_cfg (Mapping): the ``model`` section of a config.

    Returns:
        str, optional: the problem, None when there is none (or the detector
        has no ``ResNetSBP`` + ``FPNSBP`` pair).
    """
    backbone, neck = model_cfg.get('backbone'), model_cfg.get('neck')
    if not (_is(backbone, 'ResNetSBP') and _is(neck, 'FPNSBP')):
        return None
    neck_sbp = neck.get('sbp') or {}
    try:
        backbone_sbp, _ = SBPConfig.from_dict(backbone.get('sbp'), ('stages', 'blocks'),
                                              'ResNetSBP')
        SBPConfig.from_dict(neck_sbp, ('own_mask',), 'FPNSBP')
    except (KeyError, TypeError, ValueError) as err:  # what building the modules would raise
        return str(err.args[0])
    for key in SHARED_KEYS:
        if key in neck_sbp and neck_sbp[key] != getattr(backbone_sbp, key):
            return neck_disagreement(key, neck_sbp[key], getattr(backbone_sbp, key))
    return None
